"""ExecutionPlan: what the Planner (planner.py) returns -- fragments (connected runs of work
on one device), transfers between them, uploads, a valid order of steps -- with its queries,
its printed and JSON forms, validation, and rebinding to another recording of the same
program.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from genie.graph.ir import Graph
from genie.scheduler.errors import PlanValidationError
from genie.scheduler.placement import format_bytes

__all__ = ["ExecutionPlan", "Fragment", "Transfer"]


@dataclass
class Fragment:
    """A connected run of work on one device."""

    id: int
    device: str
    node_ids: list[int]  # compute nodes in program order (recomputed copies included)
    view_ids: list[int] = field(default_factory=list)  # views riding along (they run nothing)
    recomputed: list[int] = field(default_factory=list)  # node ids run here as copies
    inputs: list[int] = field(default_factory=list)  # storages that come from outside
    outputs: list[int] = field(default_factory=list)  # storages sent elsewhere or final here
    deps: list[int] = field(default_factory=list)  # fragments that must finish first
    est_time: float = 0.0
    # (storage, version node id or -1) per node, for validate()
    reads: list[list[tuple[int, int]]] = field(default_factory=list, repr=False)
    writes: list[list[int]] = field(default_factory=list, repr=False)


@dataclass
class Transfer:
    """One storage moved between devices. ``version`` is the node id whose write it
    carries, or -1 for the graph's input value (then ``src_fragment`` is None)."""

    id: int
    storage: int
    nbytes: int
    src_device: str
    dst_device: str
    src_fragment: int | None
    dst_fragment: int
    version: int
    est_time: float = 0.0


@dataclass
class ExecutionPlan:
    graph_hash: str
    devices: list[str]
    fragments: list[Fragment]
    transfers: list[Transfer]
    uploads: dict[str, list[int]]  # device -> constants it needs
    steps: list[tuple[str, int]]  # ("transfer", id) | ("fragment", id), in a valid order
    homes: dict[int, str]  # storage -> device holding its final value
    flags: dict[str, Any]
    estimated_time: float
    strategy: str = ""
    resident: dict[int, str] = field(default_factory=dict)
    copies: dict[int, list[str]] = field(default_factory=dict)  # resident inputs' other copies
    constants: frozenset[int] = frozenset()  # graph inputs that are uploads from the client
    upload_bytes: dict[str, int] = field(default_factory=dict)  # device -> bytes of its uploads
    _srefs: dict[int, tuple[int, int, int]] = field(default_factory=dict, repr=False)
    _node_ids: tuple[int, ...] = field(default=(), repr=False)

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_fragments(self) -> int:
        return len(self.fragments)

    @property
    def transfer_bytes(self) -> int:
        return sum(t.nbytes for t in self.transfers)

    def fragments_on(self, device: str) -> list[Fragment]:
        return [f for f in self.fragments if f.device == device]

    def incoming(self, fragment_id: int) -> list[Transfer]:
        return [t for t in self.transfers if t.dst_fragment == fragment_id]

    def moves(self) -> list[dict[str, Any]]:
        """What crosses each link: uploads from the client per device, then transfers per
        (source, destination) pair, with counts and bytes (what the schedule chart labels)."""
        out: list[dict[str, Any]] = [
            {"src": "client", "dst": d, "count": len(self.uploads[d]), "bytes": nb}
            for d, nb in self.upload_bytes.items()
            if d in self.uploads
        ]
        pairs: dict[tuple[str, str], list[int]] = {}
        for t in self.transfers:
            c = pairs.setdefault((t.src_device, t.dst_device), [0, 0])
            c[0] += 1
            c[1] += t.nbytes
        out += [{"src": a, "dst": b, "count": n, "bytes": nb} for (a, b), (n, nb) in pairs.items()]
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "graph_hash": self.graph_hash[:16],
            "strategy": self.strategy,
            "fragments": len(self.fragments),
            "fragments_per_device": {d: len(self.fragments_on(d)) for d in self.devices},
            "transfers": len(self.transfers),
            "transfer_bytes": self.transfer_bytes,
            "uploads": {d: len(v) for d, v in self.uploads.items()},
            "flags": dict(self.flags),
            "estimated_time_ms": self.estimated_time * 1e3,
        }

    def format(self, max_rows: int = 40) -> str:
        s = self.summary()
        lines = [
            f"plan  fragments={s['fragments']}  transfers={s['transfers']} "
            f"({self.transfer_bytes / (1 << 20):.2f} MiB)  estimated={self.estimated_time * 1e3:.3f} ms  "
            f"flags={self.flags}",
        ]
        for kind, i in self.steps[:max_rows]:
            if kind == "fragment":
                f = self.fragments[i]
                lines.append(
                    f"  fragment {f.id:>3} on {f.device:<10} {len(f.node_ids):>4} nodes "
                    f"{f.est_time * 1e3:8.3f} ms  after {f.deps}"
                )
            else:
                t = self.transfers[i]
                lines.append(
                    f"  transfer {t.id:>3} s{t.storage} {t.nbytes / (1 << 20):.3f} MiB "
                    f"{t.src_device} -> {t.dst_device} ({t.est_time * 1e6:.1f} us)"
                )
        if len(self.steps) > max_rows:
            lines.append(f"  ... {len(self.steps) - max_rows} more steps")
        for m in self.moves():
            what = "upload" if m["src"] == "client" else "transfer"
            lines.append(
                f"  moves {m['src']} -> {m['dst']}: {m['count']} {what}(s), "
                f"{format_bytes(m['bytes'], 1)}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "fragment_list": [
                {
                    "id": f.id,
                    "device": f.device,
                    "nodes": f.node_ids,
                    "recomputed": f.recomputed,
                    "inputs": f.inputs,
                    "outputs": f.outputs,
                    "deps": f.deps,
                    "est_ms": f.est_time * 1e3,
                }
                for f in self.fragments
            ],
            "moves": self.moves(),
            "transfer_list": [
                {
                    "id": t.id,
                    "storage": t.storage,
                    "bytes": t.nbytes,
                    "src": t.src_device,
                    "dst": t.dst_device,
                    "src_fragment": t.src_fragment,
                    "dst_fragment": t.dst_fragment,
                    "version": t.version,
                }
                for t in self.transfers
            ],
            "steps": self.steps,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> ExecutionPlan:
        """Raise PlanValidationError unless the fragment graph is acyclic, ``steps`` is a
        valid order, and every value a node reads is on its device, in the version it
        expects: produced earlier there, uploaded, resident, or transferred in after its
        producer ran. Returns the plan."""
        problems: list[str] = []
        nf = len(self.fragments)
        # Acyclic (Kahn).
        indeg = [0] * nf
        succ: list[list[int]] = [[] for _ in range(nf)]
        for f in self.fragments:
            for d in f.deps:
                if not 0 <= d < nf:
                    problems.append(f"fragment {f.id} depends on unknown fragment {d}")
                    continue
                indeg[f.id] += 1
                succ[d].append(f.id)
        ready = [i for i in range(nf) if indeg[i] == 0]
        seen = 0
        while ready:
            i = ready.pop()
            seen += 1
            for j in succ[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    ready.append(j)
        if seen != nf:
            problems.append(f"the fragment graph has a cycle ({nf - seen} fragments on it)")
        ancestors = self._ancestors() if seen == nf else None
        for t in self.transfers:
            if (
                t.src_fragment is not None
                and ancestors is not None
                and not (ancestors[t.dst_fragment] >> t.src_fragment) & 1
            ):
                problems.append(
                    f"transfer {t.id} (s{t.storage}) leaves fragment {t.src_fragment}, "
                    f"which fragment {t.dst_fragment} does not depend on"
                )
        # Replay the steps: which version of each storage is on each device.
        have: dict[str, dict[int, int]] = {d: {} for d in self.devices}
        for d, sids in self.uploads.items():
            for s in sids:
                have.setdefault(d, {})[s] = -1
        for s, d in self.resident.items():
            have.setdefault(d, {})[s] = -1
        for s, ds in self.copies.items():
            for d in ds:
                have.setdefault(d, {})[s] = -1
        done: set[int] = set()
        transfers = {t.id: t for t in self.transfers}
        for kind, i in self.steps:
            if (kind == "transfer" and i not in transfers) or (
                kind == "fragment" and not 0 <= i < nf
            ):
                problems.append(f"step ({kind}, {i}) names no such {kind}")
                continue
            if kind == "transfer":
                t = transfers[i]
                if t.src_fragment is not None and t.src_fragment not in done:
                    problems.append(
                        f"transfer {t.id} runs before its source fragment {t.src_fragment}"
                    )
                cur = have.get(t.src_device, {}).get(t.storage)
                if cur != t.version and not (t.version == -1 and t.storage not in self.resident):
                    problems.append(
                        f"transfer {t.id} wants s{t.storage} version {t.version} on "
                        f"{t.src_device}, which holds {cur}"
                    )
                have.setdefault(t.dst_device, {})[t.storage] = t.version
                continue
            f = self.fragments[i]
            for dep in f.deps:
                if dep not in done:
                    problems.append(f"fragment {f.id} runs before fragment {dep} it depends on")
            dev = have.setdefault(f.device, {})
            for nid, reads, writes in zip(f.node_ids, f.reads, f.writes, strict=False):
                for s, v in reads:
                    cur = dev.get(s, "missing")
                    if cur == v:
                        continue
                    if (
                        v == -1
                        and cur == "missing"
                        and s not in self.resident
                        and s not in self.constants
                    ):
                        continue  # resident somewhere the plan was not told about
                    problems.append(
                        f"fragment {f.id} on {f.device}: node {nid} reads s{s} version {v} but the "
                        f"device holds {cur} (neither produced there, uploaded, nor transferred)"
                    )
                for s in writes:
                    dev[s] = nid
            done.add(f.id)
        if len(done) != nf:
            problems.append(f"steps run {len(done)} of {nf} fragments")
        if problems:
            raise PlanValidationError(
                "genie: invalid execution plan:\n  " + "\n  ".join(problems[:20])
            )
        return self

    def _ancestors(self) -> list[int]:
        order = [i for k, i in self.steps if k == "fragment"]
        anc = [0] * len(self.fragments)
        for i in order:
            a = 0
            for d in self.fragments[i].deps:
                a |= anc[d] | (1 << d)
            anc[i] = a
        return anc

    # -- rebinding ---------------------------------------------------------------------------
    def bind(
        self,
        graph: Graph,
        resident: dict[int, str] | None = None,
        copies: dict[int, list[str]] | None = None,
    ) -> ExecutionPlan:
        """This plan for another recording of the same program (same structural hash)."""
        ids = tuple(n.id for n in graph.nodes)
        if ids == self._node_ids:
            if resident is not None:
                self.resident = dict(resident)
            if copies is not None:
                self.copies = dict(copies)
            return self
        idmap = dict(zip(self._node_ids, ids, strict=True))
        idmap[-1] = -1
        nodes = graph.nodes
        smap: dict[int, int] = {}
        for s, (pos, kind, i) in self._srefs.items():
            n = nodes[pos]
            smap[s] = (n.outputs if kind else n.inputs)[i].storage

        def S(s: int) -> int:
            return smap.get(s, s)

        frags = [
            Fragment(
                f.id,
                f.device,
                [idmap[i] for i in f.node_ids],
                [idmap[i] for i in f.view_ids],
                [idmap[i] for i in f.recomputed],
                [S(s) for s in f.inputs],
                [S(s) for s in f.outputs],
                list(f.deps),
                f.est_time,
                [[(S(s), idmap[v]) for s, v in r] for r in f.reads],
                [[S(s) for s in w] for w in f.writes],
            )
            for f in self.fragments
        ]
        transfers = [
            Transfer(
                t.id,
                S(t.storage),
                t.nbytes,
                t.src_device,
                t.dst_device,
                t.src_fragment,
                t.dst_fragment,
                idmap[t.version],
                t.est_time,
            )
            for t in self.transfers
        ]
        return ExecutionPlan(
            graph_hash=self.graph_hash,
            devices=self.devices,
            fragments=frags,
            transfers=transfers,
            uploads={d: [S(s) for s in v] for d, v in self.uploads.items()},
            steps=self.steps,
            homes={S(s): d for s, d in self.homes.items()},
            flags=self.flags,
            estimated_time=self.estimated_time,
            strategy=self.strategy,
            resident=dict(resident)
            if resident is not None
            else {S(s): d for s, d in self.resident.items()},
            copies=dict(copies)
            if copies is not None
            else {S(s): d for s, d in self.copies.items()},
            constants=frozenset(S(s) for s in self.constants),
            upload_bytes=self.upload_bytes,
            _srefs={smap.get(s, s): r for s, r in self._srefs.items()},
            _node_ids=ids,
        )
