"""The cost model: FLOPs and bytes per op family, roofline time on a DeviceSpec, transfer time
over the topology, queueing delay, and calibration from measured times.

FLOP conventions follow ``torch.utils.flop_counter`` (a multiply-add counts 2, bias additions
of addmm/convolution are not counted), so counts can be checked against ``FlopCounterMode``:

* mm ``[M,K]x[K,N]``: ``2MKN``; addmm the same; bmm/baddbmm ``2BMKN``
* convolution: ``2 * N * Cout * prod(out_spatial) * (Cin/groups) * prod(kernel)``
  (transposed: input spatial instead of output spatial)
* attention ``q[B,H,Sq,D] k[B,H,Sk,D] v[B,H,Sk,Dv]``: ``2BHSqSkD + 2BHSqSkDv``
* elementwise: one per output element; reductions: one per input element (softmax five);
  normalisation: five per element (batch norm in eval: two); embedding and data movement: none.

Bytes are what an op reads and writes: each distinct input view once (broadcast dimensions
read once), fresh outputs and in-place writes. Views cost nothing.

Note: [Roofline]
time = max(flops / (peak * efficiency), bytes / (bandwidth * efficiency)) + launch overhead,
with the matrix-unit peak for the dtype (matmul, conv, attention) or the vector peak for the
rest. ``GraphCostEstimator.observe`` folds measured times back in as a per (device, family)
factor, so the same roofline becomes the measured figure after a few runs (the adaptive path).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from genie.graph.ir import Graph, Node, TensorMeta
from genie.scheduler.devices import DeviceSpec

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "MATRIX_FAMILIES",
    "NodeCost",
    "GraphCostEstimator",
    "op_family",
    "is_view",
    "node_cost",
]

MATMUL = "matmul"
CONV = "conv"
ATTENTION = "attention"
ELEMENTWISE = "elementwise"
REDUCTION = "reduction"
NORMALIZATION = "normalization"
EMBEDDING = "embedding"
DATA_MOVEMENT = "data_movement"
VIEW = "view"

FAMILIES = (MATMUL, CONV, ATTENTION, ELEMENTWISE, REDUCTION, NORMALIZATION, EMBEDDING, DATA_MOVEMENT, VIEW)
MATRIX_FAMILIES = frozenset((MATMUL, CONV, ATTENTION))

_BY_NAME: dict[str, str] = {}
for _fam, _names in {
    MATMUL: "mm addmm bmm baddbmm addbmm matmul linear addmv mv dot vdot outer _addmm_activation "
    "_scaled_mm _int_mm",
    CONV: "convolution _convolution conv1d conv2d conv3d conv_transpose1d conv_transpose2d "
    "conv_transpose3d cudnn_convolution cudnn_convolution_transpose mkldnn_convolution "
    "_slow_conv2d_forward convolution_overrideable _conv_depthwise2d slow_conv3d_forward "
    "convolution_backward",
    ATTENTION: "scaled_dot_product_attention _scaled_dot_product_attention_math "
    "_scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_for_cpu "
    "_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention "
    "_scaled_dot_product_fused_attention_overrideable _flash_attention_forward "
    "_efficient_attention_forward _transformer_encoder_layer_fwd _native_multi_head_attention",
    NORMALIZATION: "native_layer_norm layer_norm native_batch_norm batch_norm _native_batch_norm_legit "
    "_native_batch_norm_legit_no_training _native_batch_norm_legit_functional cudnn_batch_norm "
    "native_group_norm group_norm rms_norm _fused_rms_norm instance_norm",
    EMBEDDING: "embedding embedding_bag _embedding_bag _embedding_bag_forward_only",
    REDUCTION: "sum mean amax amin max min argmax argmin prod var std var_mean std_mean norm "
    "linalg_vector_norm logsumexp _softmax softmax _log_softmax log_softmax cumsum cumprod all any "
    "topk sort max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices "
    "avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d _adaptive_avg_pool2d "
    "adaptive_avg_pool3d _adaptive_avg_pool3d adaptive_max_pool2d count_nonzero",
    DATA_MOVEMENT: "cat stack clone copy copy_ _to_copy to contiguous index index_put index_put_ "
    "_index_put_impl_ gather scatter scatter_add scatter_reduce slice_scatter select_scatter "
    "index_copy index_copy_ index_add index_add_ index_select constant_pad_nd pad repeat roll flip "
    "tril triu masked_scatter expand_copy permute_copy transpose_copy view_copy "
    "zeros zeros_like ones ones_like full full_like empty empty_like empty_strided arange "
    "new_zeros new_ones new_full new_empty fill fill_ zero_ lift_fresh_copy _local_scalar_dense "
    "resize_ set_ nonzero masked_select unique _unique2 repeat_interleave",
}.items():
    for _n in _names.split():
        _BY_NAME[_n] = _fam

_FAMILY_CACHE: dict[str, str] = {}
# Allocations that write nothing.
_UNINITIALISED = frozenset(("empty", "empty_like", "empty_strided", "new_empty", "empty_permuted"))


def op_family(op: str) -> str:
    """The family of an op by name (``aten::addmm.default`` -> ``matmul``); unknown ops count
    as elementwise, i.e. memory bound."""
    fam = _FAMILY_CACHE.get(op)
    if fam is None:
        name = op.split("::", 1)[-1].split(".", 1)[0]
        fam = _BY_NAME.get(name)
        if fam is None:
            fam = _BY_NAME.get(name.rstrip("_"), ELEMENTWISE)
        _FAMILY_CACHE[op] = fam
    return fam


def is_view(node: Node) -> bool:
    """A node that only makes views (``view``, ``transpose``, ``detach``...): it runs no
    kernel and must sit with the storage it views (see Note: [Storage identity])."""
    if node.writes or not node.outputs:
        return False
    for a in node.output_alias:
        if a < 0:
            return False
    return True


@dataclass(frozen=True)
class NodeCost:
    """What one node does, independent of the device."""

    family: str
    flops: float
    bytes: float
    dtype: torch.dtype

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf


_ZERO = NodeCost(VIEW, 0.0, 0.0, torch.float32)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _touched_bytes(t: TensorMeta) -> int:
    """Bytes a kernel reads from a view: broadcast (stride 0) dimensions are read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride, strict=False):
        if stride != 0:
            n *= size
    return n * t.dtype.itemsize


def _values(node: Node) -> list:
    return [v for k, v in node.args if k == "value"]


def _matmul_flops(node: Node) -> float:
    name = node.name
    ins = node.inputs
    if name in ("addmm", "_addmm_activation", "addbmm", "baddbmm", "addmv"):
        ins = ins[1:]  # the bias / accumulator is not counted
    if len(ins) < 2:
        return 0.0
    a, b = ins[0].shape, ins[1].shape
    if name == "linear":  # x[..., K] @ w[N, K]^T
        return 2.0 * _numel(a[:-1]) * a[-1] * b[0]
    if len(a) == 1 and len(b) == 1:  # dot
        return 2.0 * a[0]
    if len(b) == 1:  # mv
        return 2.0 * _numel(a)
    if len(a) == 1:
        return 2.0 * _numel(b)
    m, k = a[-2], a[-1]
    n = b[-1]
    batch = max(_numel(a[:-2]), _numel(b[:-2]))
    if name == "addbmm":
        batch = a[0]
    return 2.0 * batch * m * k * n


def _conv_flops(node: Node) -> float:
    name = node.name
    if name == "convolution_backward":  # (grad_out, input, weight): grad input + grad weight
        if len(node.inputs) < 3:
            return 0.0
        g, x, w = node.inputs[0].shape, node.inputs[1].shape, node.inputs[2].shape
        return 2.0 * _conv_count(x, w, g, False)
    if len(node.inputs) < 2 or not node.outputs:
        return 0.0
    x, w = node.inputs[0].shape, node.inputs[1].shape
    out = node.outputs[0].shape
    vals = _values(node)
    transposed = "transpose" in name or (len(vals) >= 4 and vals[3] is True)
    return float(_conv_count(x, w, out, transposed))


def _conv_count(x, w, out, transposed: bool) -> int:
    """torch.utils.flop_counter.conv_flop_count, exactly."""
    if len(x) < 3 or len(w) < 3:
        return 0
    conv_shape = (x if transposed else out)[2:]
    c_out, c_in, *kernel = w
    return _numel(conv_shape) * _numel(kernel) * x[0] * c_out * c_in * 2


def _fused_block_flops(node: Node) -> float:
    """Fused transformer blocks (``_transformer_encoder_layer_fwd``, ``_native_multi_head_attention``):
    every 2-D weight is a projection over all tokens, plus the attention itself."""
    x = node.inputs[0].shape
    if len(x) != 3:
        return 0.0
    b, seq, dim = x
    tokens = b * seq
    flops = 0.0
    for t in node.inputs[1:]:
        if len(t.shape) == 2 and dim in t.shape:
            flops += 2.0 * tokens * t.shape[0] * t.shape[1]
    if node.name == "_native_multi_head_attention" and len(node.inputs) >= 3:
        seq_k = node.inputs[1].shape[1] if len(node.inputs[1].shape) == 3 else seq
    else:
        seq_k = seq
    return flops + 4.0 * b * seq * seq_k * dim


def _attention_flops(node: Node) -> float:
    if node.name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention"):
        return _fused_block_flops(node)
    if len(node.inputs) < 3:
        return 0.0
    q, k, v = (t.shape for t in node.inputs[:3])
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        if len(q) == 3 and len(k) == 3 and len(v) == 3:  # [B*H, S, D]
            return 2.0 * q[0] * q[1] * k[1] * q[2] + 2.0 * q[0] * q[1] * k[1] * v[2]
        return 0.0
    if node.name in ("_flash_attention_forward", "_efficient_attention_forward"):  # [B, S, H, D]
        b, sq, h, d = q
        sk, dv = k[1], v[3]
    else:
        b, h, sq, d = q
        sk, dv = k[2], v[3]
    flops = 2.0 * b * h * sq * sk * d + 2.0 * b * h * sq * sk * dv
    if "backward" in node.name:
        flops *= 2.5
    return flops


def _reduction_flops(node: Node) -> float:
    name = node.name
    if not node.inputs:
        return 0.0
    n_in = _numel(node.inputs[0].shape)
    if "softmax" in name:
        return 5.0 * n_in
    if name.startswith(("max_pool", "avg_pool")) and node.outputs:
        vals = _values(node)
        kernel = vals[0] if vals and isinstance(vals[0], (list, tuple)) else [1]
        return float(_numel(node.outputs[0].shape) * _numel(kernel))
    if name in ("var", "std", "var_mean", "std_mean"):
        return 3.0 * n_in
    return float(n_in)


def _norm_flops(node: Node) -> float:
    if not node.inputs:
        return 0.0
    n = _numel(node.inputs[0].shape)
    if "batch_norm" in node.name:
        vals = _values(node)
        training = bool(vals[0]) if vals and isinstance(vals[0], bool) else False
        if node.name == "_native_batch_norm_legit_no_training":
            training = False
        return (5.0 if training else 2.0) * n
    if "rms" in node.name:
        return 4.0 * n
    return 5.0 * n


def node_cost(node: Node) -> NodeCost:
    """FLOPs, bytes and family of one node (device independent)."""
    if is_view(node):
        return _ZERO
    fam = op_family(node.op)
    # Bytes: every distinct input view once, fresh outputs and in-place writes.
    nbytes = 0
    seen: set = set()
    for t in node.inputs:
        key = (t.storage, t.offset, t.shape, t.stride)
        if key not in seen:
            seen.add(key)
            nbytes += _touched_bytes(t)
    if node.name not in _UNINITIALISED:
        for out, alias in zip(node.outputs, node.output_alias, strict=False):
            if alias < 0 or out.storage in node.writes:
                nbytes += out.numel * out.dtype.itemsize
    if fam == MATMUL:
        flops = _matmul_flops(node)
    elif fam == CONV:
        flops = _conv_flops(node)
    elif fam == ATTENTION:
        flops = _attention_flops(node)
    elif fam == REDUCTION:
        flops = _reduction_flops(node)
    elif fam == NORMALIZATION:
        flops = _norm_flops(node)
    elif fam in (EMBEDDING, DATA_MOVEMENT):
        flops = 0.0
    else:
        flops = float(node.outputs[0].numel) if node.outputs else 0.0
    ref = node.inputs[0] if (fam in MATRIX_FAMILIES and node.inputs) else (
        node.outputs[0] if node.outputs else (node.inputs[0] if node.inputs else None))
    if fam in (MATMUL,) and node.name in ("addmm", "baddbmm", "_addmm_activation") and len(node.inputs) > 1:
        ref = node.inputs[1]
    dtype = ref.dtype if ref is not None else torch.float32
    return NodeCost(fam, flops, float(nbytes), dtype)


class GraphCostEstimator:
    """Roofline estimates per node and device, transfer and queueing times, and calibration
    factors learnt from measured execution times (see Note: [Roofline])."""

    def __init__(self, calibration: dict[tuple[str, str], float] | None = None, smoothing: float = 0.5):
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("genie: smoothing must be in (0, 1]")
        self.smoothing = smoothing
        self._factors: dict[tuple[str, str], float] = dict(calibration or {})
        self._observations: dict[tuple[str, str], int] = {}
        self._version = 0
        self._lock = threading.Lock()

    # -- per node ------------------------------------------------------------------------
    def node_cost(self, node: Node) -> NodeCost:
        return node_cost(node)

    def roofline(self, cost: NodeCost, spec: DeviceSpec) -> float:
        """Uncalibrated roofline time of a node cost on a device, in seconds."""
        if cost.family == VIEW or (cost.flops == 0 and cost.bytes == 0):
            return 0.0  # nothing to launch (a view, an uninitialised ``empty``)
        if cost.family in MATRIX_FAMILIES:
            rate = spec.matmul_flops(cost.dtype) * spec.matmul_efficiency
        else:
            rate = spec.vector_rate() * spec.vector_efficiency
        compute = cost.flops / rate if rate > 0 else 0.0
        memory = cost.bytes / (spec.memory_bandwidth * spec.memory_efficiency)
        return max(compute, memory) + spec.launch_overhead_s

    def time(self, cost: NodeCost, spec: DeviceSpec) -> float:
        """Calibrated time of a node cost on a device, in seconds."""
        t = self.roofline(cost, spec)
        if t and self._factors:
            t *= self._factors.get((spec.name, cost.family), 1.0)
        return t

    def node_time(self, node: Node, spec: DeviceSpec) -> float:
        return self.time(node_cost(node), spec)

    # -- per graph -----------------------------------------------------------------------
    def graph_costs(self, graph: Graph) -> dict[int, NodeCost]:
        return {n.id: node_cost(n) for n in graph.nodes}

    def estimate(self, graph: Graph, spec: DeviceSpec) -> dict[str, float]:
        """Totals for running the whole graph on one device: seconds per family and overall."""
        out: dict[str, float] = {}
        for n in graph.nodes:
            c = node_cost(n)
            if c.family == VIEW:
                continue
            out[c.family] = out.get(c.family, 0.0) + self.time(c, spec)
        out["total"] = sum(out.values())
        return out

    def flops_by_family(self, graph: Graph) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in graph.nodes:
            c = node_cost(n)
            out[c.family] = out.get(c.family, 0.0) + c.flops
        return out

    # -- network and queues --------------------------------------------------------------
    def transfer_time(self, nbytes: int, src: str, dst: str, topology) -> float:
        """Bytes / bandwidth + latency (+ queueing on busy links) along the topology's path."""
        return topology.transfer_time(nbytes, src, dst)

    def queueing_delay(self, device) -> float:
        """Seconds a device's known backlog delays new work (``Device.queued_s``)."""
        return float(getattr(device, "queued_s", 0.0))

    # -- calibration (the adaptive path) -------------------------------------------------
    def calibration_factor(self, spec: DeviceSpec | str, family: str) -> float:
        name = spec if isinstance(spec, str) else spec.name
        return self._factors.get((name, family), 1.0)

    @property
    def calibration(self) -> dict[tuple[str, str], float]:
        return dict(self._factors)

    @property
    def version(self) -> int:
        """Changes whenever calibration changes (part of schedule cache keys)."""
        return self._version

    def observe(self, family: str, spec: DeviceSpec | str, predicted_s: float, measured_s: float) -> float:
        """Fold one measurement into the (device, family) factor; returns the new factor.
        `predicted_s` is the uncalibrated roofline time of the same work."""
        if predicted_s <= 0 or measured_s <= 0:
            return self.calibration_factor(spec, family)
        name = spec if isinstance(spec, str) else spec.name
        ratio = measured_s / predicted_s
        with self._lock:
            key = (name, family)
            old = self._factors.get(key)
            new = ratio if old is None else math.exp(
                (1 - self.smoothing) * math.log(old) + self.smoothing * math.log(ratio))
            self._factors[key] = new
            self._observations[key] = self._observations.get(key, 0) + 1
            self._version += 1
        return new

    def observe_nodes(self, nodes: Iterable[Node], spec: DeviceSpec, measured_s: float) -> None:
        """Calibrate from the measured time of several nodes run together (a fragment): the
        time is shared among families in proportion to their predicted share."""
        by_family: dict[str, float] = {}
        for n in nodes:
            c = node_cost(n)
            if c.family != VIEW:
                by_family[c.family] = by_family.get(c.family, 0.0) + self.roofline(c, spec)
        total = sum(by_family.values())
        if total <= 0:
            return
        for fam, pred in by_family.items():
            self.observe(fam, spec, pred, measured_s * pred / total)

    def calibrate(self, graph: Graph, measured: dict[int, float], spec: DeviceSpec) -> dict[str, float]:
        """Calibrate from per-node measured seconds (node id -> s); returns the new factors
        per family for this device."""
        pred: dict[str, float] = {}
        meas: dict[str, float] = {}
        for n in graph.nodes:
            if n.id not in measured:
                continue
            c = node_cost(n)
            if c.family == VIEW:
                continue
            pred[c.family] = pred.get(c.family, 0.0) + self.roofline(c, spec)
            meas[c.family] = meas.get(c.family, 0.0) + measured[n.id]
        return {fam: self.observe(fam, spec, pred[fam], meas[fam]) for fam in pred}

    def reset_calibration(self) -> None:
        with self._lock:
            self._factors.clear()
            self._observations.clear()
            self._version += 1
