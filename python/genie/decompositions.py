"""Ops PyTorch chooses by device type, decomposed so that every executor can run them.

Note: [Ops chosen by device type]
Some of PyTorch's composite kernels pick the op they call from the device of their inputs:
``gru_cell`` and ``lstm_cell`` (and so ``nn.GRU``, ``nn.LSTM``, ``nn.GRUCell``, ``nn.LSTMCell``)
call ``_thnn_fused_gru_cell`` / ``_thnn_fused_lstm_cell`` for any tensor that is not on the CPU,
remote_accelerator included, and those ops have CUDA kernels only. Recorded as they are, they
cannot run on a CPU executor, and not in the host fallback either (Note: [Host fallback] in
csrc/capture/executor.cpp), since the host is a CPU.

The rule is general: every aten op that the executor's device cannot run (no kernel for it, not
even a composite one, and none for the CPU either, the host fallback of every executor) and for
which a decomposition is known runs, on remote_accelerator, as that decomposition. On a CPU
target that is every op without a CPU kernel; on a CUDA target, where this process's torch has
CUDA kernels, the fused cells keep their CUDA kernels. The set follows the target device type
(``set_target_type`` re-installs it). Each decomposition is registered twice: on AutogradPrivateUse1, so autograd differentiates the decomposed ops and no backward
kernel of the fused op is ever needed, and on PrivateUse1, for calls that skip autograd
(inference mode). Decompositions come from PyTorch's own table (``torch._decomp``) first; genie's
table below fills the gaps PyTorch leaves, written to compute what the CPU path of the calling
composite computes, in the same order of operations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

__all__ = ["install", "decomposed_ops"]

aten = torch.ops.aten

_lib: torch.library.Library | None = None
_target: str | None = None
_decomposed: list[str] = []


def _thnn_fused_gru_cell(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    # As GRUCell's CPU path in aten/src/ATen/native/RNN.cpp, with the biases the fused op
    # takes apart added where the CPU path's linear adds them.
    ig = input_gates if input_bias is None else input_gates + input_bias
    hg = hidden_gates if hidden_bias is None else hidden_gates + hidden_bias
    i_r, i_i, i_n = ig.chunk(3, 1)
    h_r, h_i, h_n = hg.chunk(3, 1)
    reset_gate = (h_r + i_r).sigmoid()
    input_gate = (h_i + i_i).sigmoid()
    new_gate = (i_n + h_n * reset_gate).tanh()
    hy = (hx - new_gate) * input_gate + new_gate
    # The CUDA kernel's workspace layout, for anything that reads it.
    workspace = torch.cat([reset_gate, input_gate, new_gate, h_n, hx], 1)
    return hy, workspace


def _thnn_fused_lstm_cell(input_gates, hidden_gates, cx, input_bias=None, hidden_bias=None):
    # As LSTMCell's CPU path: gates = linear_hh(hx) + linear_ih(input).
    hg = hidden_gates if hidden_bias is None else hidden_gates + hidden_bias
    ig = input_gates if input_bias is None else input_gates + input_bias
    gates = hg + ig
    i, f, g, o = gates.chunk(4, 1)
    ingate, forgetgate, cellgate, outgate = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = forgetgate * cx + ingate * cellgate
    hy = outgate * cy.tanh()
    workspace = torch.cat([ingate, forgetgate, cellgate, outgate], 1)
    return hy, cy, workspace


# Decompositions PyTorch's table lacks, by overload name.
_GENIE_TABLE: dict[str, Callable] = {
    "aten::_thnn_fused_gru_cell": _thnn_fused_gru_cell,
    "aten::_thnn_fused_lstm_cell": _thnn_fused_lstm_cell,
}


def _cannot_run(name: str, target: str) -> bool:
    def has(key: str) -> bool:
        return torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, key)

    if has("CPU"):
        return False
    return not (target == "cuda" and has("CUDA"))


def _known_decompositions() -> dict[str, Callable]:
    from torch._decomp import decomposition_table

    table: dict[str, Callable] = {}
    for op, fn in decomposition_table.items():
        name = op.name()  # "aten::addmm.dtype"; a default overload has no suffix
        if name.startswith("aten::"):
            table[name] = fn
    for name, fn in _GENIE_TABLE.items():
        table.setdefault(name, fn)
    return table


def install(target: str = "cpu") -> list[str]:
    """Register the decompositions for flushes that run on `target` ("cpu", "cuda"...): see
    Note: [Ops chosen by device type]. Idempotent per target; returns the overload names
    decomposed on remote_accelerator."""
    global _lib, _target
    if _lib is not None and target == _target:
        return list(_decomposed)
    if _lib is not None:
        _lib._destroy()
        _decomposed.clear()
    lib = torch.library.Library("aten", "IMPL")
    for name, fn in sorted(_known_decompositions().items()):
        if not _cannot_run(name, target):
            continue
        short = name[len("aten::") :]
        for key in ("AutogradPrivateUse1", "PrivateUse1"):
            try:
                lib.impl(short, fn, key)
            except RuntimeError as e:  # a kernel is registered for the key already
                logger.debug("genie: not decomposing %s on %s: %s", name, key, e)
                break
        else:
            _decomposed.append(name)
    _lib, _target = lib, target
    logger.debug(
        "genie: decomposing %d ops %s cannot run: %s", len(_decomposed), target, _decomposed
    )
    return list(_decomposed)


def decomposed_ops() -> list[str]:
    """The aten overloads remote_accelerator runs as decompositions."""
    return list(_decomposed)
