"""The analyzer's result cache: what it keys on and how a hit is replayed onto a new graph.

Note: [Analysis cache]
Results are cached by the graph's structural hash together with the column of module
context ids (interned, so the same model recorded the same way repeats it) and whether a
model was given (which inputs are its parameters follows from the structure). A hit replays the cached node annotations onto
the new graph's nodes by position and maps node and storage ids from the cached graph to the
new one, so the profile names the new graph's ids; the phase detector still sees the call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from genie.semantic.phases import CallPhase
from genie.semantic.profile import WorkloadProfile

__all__ = ["CacheEntry", "cache_key", "replay"]


@dataclass
class CacheEntry:
    """A cached analysis: the profile and annotations as computed for one graph."""

    profile: WorkloadProfile
    metas: list[dict[str, Any]]
    node_ids: list[int]
    inputs: list[int]
    call: CallPhase | None


def cache_key(graph, with_model: bool, fast_patterns: bool, phase_detection: bool) -> tuple:
    """Which inputs are parameters follows from the program's structure (the same model
    recorded the same way puts its weights at the same input positions), so whether a model
    was given is all the key needs about it."""
    ctx_sig = hash(tuple([n.context for n in graph.nodes]))
    return (graph.structural_hash(), ctx_sig, with_model, fast_patterns, phase_detection)


def replay(entry: CacheEntry, graph) -> WorkloadProfile:
    """The cached profile for ``graph``: node annotations replayed by position, node and
    storage ids mapped to the new graph's."""
    nodes = graph.nodes
    new_ids = [n.id for n in nodes]
    same = new_ids == entry.node_ids
    for n, m in zip(nodes, entry.metas, strict=True):
        n.meta.update(m)
    old = entry.profile
    if same:
        nid = sid = None
    else:
        nid = dict(zip(entry.node_ids, new_ids, strict=True))
        sid = dict(zip(entry.inputs, graph.input_storages, strict=True))
        for fid in old.metadata.get("fusion_points", ()):
            n = nodes[entry.node_ids.index(fid)]
            lin = n.meta.get("lineage")
            if lin is not None:
                n.meta["lineage"] = dict(
                    lin,
                    sources={k: [nid.get(i, i) for i in v] for k, v in lin["sources"].items()},
                )

    def ids(xs):
        return list(xs) if nid is None else [nid.get(i, i) for i in xs]

    def sids(xs):
        return list(xs) if sid is None else [sid.get(s, s) for s in xs]

    md = dict(old.metadata)
    md["cache_hit"] = True
    md["fusion_points"] = ids(md.get("fusion_points", ()))
    return dataclasses.replace(
        old,
        patterns=[
            dataclasses.replace(p, nodes=ids(p.nodes), hints=dict(p.hints)) for p in old.patterns
        ],
        phases={k: ids(v) for k, v in old.phases.items()},
        metadata=md,
        residency=old.residency
        if sid is None
        else {sid.get(s, s): r for s, r in old.residency.items()},
        kv_cache=dict(
            old.kv_cache,
            nodes=ids(old.kv_cache["nodes"]),
            storages=sids(old.kv_cache["storages"]),
        ),
        graph=graph,
    )
