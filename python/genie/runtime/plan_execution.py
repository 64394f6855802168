"""Running an ExecutionPlan over a MultiDeviceExecutor's devices: fragments, each as its runs
(Note: [Runs] in releases.py), in dependency order -- concurrently across devices when the
plan's ``overlap_io`` flag is on -- with transfers between them (server to server where both
ends are genie servers: Note: [Server-to-server moves]) and each dead value released after
its last use on each device (Note: [What a device holds] in scheduler/memory.py).

MultiDeviceExecutor (multi_device.py) takes these methods from PlanExecution; they read its
backends, stats, copies, links and flags.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from genie.graph.ir import Graph, Node
from genie.runtime.backends import served
from genie.runtime.releases import ReleasePlan, split_runs
from genie.scheduler.memory import Releases
from genie.scheduler.plan import ExecutionPlan

__all__ = ["PlanExecution"]


class PlanExecution:
    """Plan execution of a MultiDeviceExecutor."""

    def _execute(self, graph: Graph, plan: ExecutionPlan, releases: Releases | None = None) -> None:
        if (
            plan.flags.get("micro_batching")
            and not plan.flags.get("sliced")
            and len({f.device for f in plan.fragments}) > 1
        ):
            raise NotImplementedError(
                "genie: this plan asks for micro-batches, but its graph holds one batch whose "
                "size is fixed in every recorded shape, so it cannot be sliced here (Note: "
                "[Replicas]); run the model once per slice (torch.chunk) and join the results "
                "(torch.cat) in one flush, and the pipeline runs the slices as micro-batches"
            )
        by_id = {n.id: n for n in graph.nodes}
        for dev, sids in plan.uploads.items():
            for s in sids:
                self._upload(s, graph.constants[s], dev)
        # Each fragment as its runs (Note: [Runs] in runtime/releases.py), and where each
        # dead value is released on each device (Note: [What a device holds]).
        runs = {
            f.id: split_runs(graph, [by_id[i] for i in f.node_ids], releases)
            for f in plan.fragments
        }
        frees = ReleasePlan.of(plan, runs, releases.dead if releases else frozenset())
        freed: set[int] = set()
        parallel = (
            self.concurrent
            and plan.flags.get("overlap_io")
            and len({f.device for f in plan.fragments}) > 1
        )
        if parallel:
            self._execute_concurrent(plan, runs, frees, freed)
        else:
            for kind, i in plan.steps:
                if kind == "transfer":
                    self._transfer(plan.transfers[i], frees, freed)
                else:
                    self._run_fragment(plan, i, runs[i], frees, freed)
        self.stats["transfers"] += len(plan.transfers)
        self.stats["transfer_bytes"] += plan.transfer_bytes
        # One home per written storage; copies elsewhere are stale now. The dead values
        # released on every device that held them have none.
        for s, dev in plan.homes.items():
            if s not in freed:
                self._set_home(s, dev)

    def _execute_concurrent(
        self,
        plan: ExecutionPlan,
        runs: dict[int, list[list[Node]]],
        frees: ReleasePlan,
        freed: set[int],
    ) -> None:
        """Each device runs its fragments in plan order on its own thread; a fragment waits
        for the fragments it depends on and for its incoming transfers (run on a transfer
        pool as soon as their source finishes). Steps are a topological order, so the
        earliest unfinished fragment can always run: no deadlock. A release after a transfer
        runs on the source device's thread once every user of the storage there is done
        (a task waits only for tasks submitted before it: no deadlock either)."""
        done: dict[int, Future] = {}
        moved: dict[int, Future] = {}
        released: list[Future] = []
        into: dict[int, list[int]] = {}
        for t in plan.transfers:
            into.setdefault(t.dst_fragment, []).append(t.id)
        pools = {
            d: ThreadPoolExecutor(1, thread_name_prefix=f"genie-{d}")
            for d in {f.device for f in plan.fragments}
        }
        xfer_pool = ThreadPoolExecutor(2, thread_name_prefix="genie-transfer")
        try:
            for kind, i in plan.steps:
                if kind == "transfer":
                    t = plan.transfers[i]
                    src = done.get(t.src_fragment) if t.src_fragment is not None else None
                    moved[i] = xfer_pool.submit(self._after, [src] if src else [], self._move, t)
                    ids = frees.after_transfer.get(i)
                    if ids:
                        frags, moves = frees.transfer_waits[i]
                        waits = [moved[i]] + [done[f] for f in frags] + [moved[m] for m in moves]
                        pool = pools.get(t.src_device, xfer_pool)
                        released.append(
                            pool.submit(self._after, waits, self._free, t.src_device, ids, freed)
                        )
                else:
                    f = plan.fragments[i]
                    waits = [done[d] for d in f.deps] + [moved[t] for t in into.get(i, ())]
                    waits += [moved[t] for t in frees.waits.get(i, ())]
                    done[i] = pools[f.device].submit(
                        self._after, waits, self._run_fragment, plan, i, runs[i], frees, freed
                    )
            for fut in list(done.values()) + list(moved.values()) + released:
                fut.result()
        finally:
            for p in pools.values():
                p.shutdown(wait=True)
            xfer_pool.shutdown(wait=True)

    @staticmethod
    def _after(waits: list[Future], fn, *args) -> None:
        for w in waits:
            w.result()  # re-raises a failure upstream
        fn(*args)

    def _run_fragment(
        self,
        plan: ExecutionPlan,
        fid: int,
        runs: list[list[Node]],
        frees: ReleasePlan,
        freed: set[int],
    ) -> None:
        f = plan.fragments[fid]
        backend = self.backends[f.device]
        if self.measure:
            backend.synchronize()
            t0 = time.perf_counter()
        self.stats["runs"] += len(runs)
        for r, nodes in enumerate(runs):
            backend.run(nodes)
            self._free(f.device, frees.after_run.get((fid, r)), freed)
        if self.measure:
            backend.synchronize()
            self.scheduler.estimator.observe_nodes(
                [n for nodes in runs for n in nodes],
                self.topology.spec(f.device),
                time.perf_counter() - t0,
            )

    def _free(self, dev: str, ids: list[int] | None, freed: set[int]) -> None:
        """Release dead values on `dev` after their last use there (Note: [What a device
        holds]); the request that follows carries the release."""
        if ids:
            self.backends[dev].release(ids)
            freed.update(ids)
            self.stats["released_early"] += len(ids)

    def _transfer(self, t, frees: ReleasePlan | None = None, freed: set[int] | None = None) -> None:
        self._move(t)
        if frees is not None:
            self._free(t.src_device, frees.after_transfer.get(t.id), freed)

    def _move(self, t) -> None:
        if t.version == -1 and t.dst_device in self._copies.get(t.storage, ()):
            return  # a valid copy of this input is already there
        src, dst = self.backends[t.src_device], self.backends[t.dst_device]
        nbytes = src.storage_nbytes(t.storage)
        if (
            self.direct
            and served(src)
            and served(dst)
            and self._links.move(src.executor, dst.executor, t.storage, nbytes)
        ):
            dst.imported(t.storage, nbytes)
            self.stats["direct_transfers"] += 1
            self.stats["direct_bytes"] += nbytes
        else:
            dst.import_(t.storage, src.export(t.storage))
        if t.version == -1:
            self._copies.setdefault(t.storage, set()).add(t.dst_device)
