"""Replicas: a graph that runs the same program on several slices of a batch, one after the
other, then joins the results (Note: [Replicas]).

    outs = [model(x) for x in batch.chunk(4)]      # recorded in one flush
    y = torch.cat(outs)

Data parallel places each replica on its own device (the weights then live on each);
a pipeline cuts every replica at the same points and runs slice i+1 of a stage while the
next stage works on slice i: micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from genie.scheduler.analysis import GraphAnalysis

__all__ = ["Replicas", "find_replicas"]

# Note: [Replicas]
# A recorded graph has the batch size written into every shape and view argument, so the
# executor cannot slice one forward into micro-batches by itself. What it can run is a
# program that does the slicing: k forwards over k slices, recorded in one flush. Those
# appear as k runs of compute nodes, one after the other, with the same ops and output
# shapes (the same program), each reading only its own nodes and the graph's inputs (the
# weights, its slice), followed by a short tail that joins them (torch.cat). The check is
# linear: the op sequence must repeat with period C/k, and no node may read a value of
# another run. Interleaved replicas (recorded step by step) are not recognised.
_MAX_TAIL = 16  # join nodes after the replicas (a cat, a reshape, a loss)


@dataclass
class Replicas:
    sets: list[list[int]]  # compute indices per replica, program order; same ops, same shapes
    tail: list[int]  # compute indices after the replicas (the join), program order

    @property
    def count(self) -> int:
        return len(self.sets)


def find_replicas(A: GraphAnalysis, max_tail: int = _MAX_TAIL) -> Replicas | None:
    """The replicas of `A`'s graph (Note: [Replicas]), or None."""
    C = len(A.cnodes)
    if C < 2:
        return None
    sig = [(n.op, tuple(tuple(t.shape) for t in n.outputs)) for n in A.cnodes]
    for t in range(C, max(C - max_tail, 2) - 1, -1):
        for k in range(t, 1, -1):  # the finest split first: every slice its own replica
            if t % k:
                continue
            size = t // k
            if _periodic(sig, size, t) and _independent(A, size, t):
                return Replicas(
                    [list(range(i * size, (i + 1) * size)) for i in range(k)], list(range(t, C))
                )
    return None


def _periodic(sig: list, size: int, t: int) -> bool:
    return all(sig[i] == sig[i - size] for i in range(size, t))


def _independent(A: GraphAnalysis, size: int, t: int) -> bool:
    """No node of a run reads (or waits for) a node of another run."""
    for ci in range(t):
        run = ci // size
        for _s, w in A.reads[ci]:
            if w >= 0 and w // size != run:
                return False
        for p in A.preds[ci]:
            if p // size != run:
                return False
    return True
