"""One op taxonomy for every layer: what kind of op a node runs, which cost family that is,
and what one node costs (FLOPs and bytes, independent of any device).

An op's *class* (``op_class``) is fine grained: what the semantic layer's patterns and roles
reason about (softmax, activation, pooling, embedding bag ...). Its *family* (``op_family``)
is the coarse grouping the cost model's roofline needs (matrix units or vector units, which
FLOP formula); every class belongs to exactly one family (``FAMILY_OF``). Both come from one
name table, so the scheduler and the semantic layer cannot disagree about an op.

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
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from genie.graph.ir import Node, TensorMeta

__all__ = [
    "FAMILIES",
    "FAMILY_OF",
    "MATRIX_FAMILIES",
    "NodeCost",
    "OpClass",
    "is_view",
    "node_cost",
    "op_class",
    "op_family",
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

FAMILIES = (
    MATMUL,
    CONV,
    ATTENTION,
    ELEMENTWISE,
    REDUCTION,
    NORMALIZATION,
    EMBEDDING,
    DATA_MOVEMENT,
    VIEW,
)
MATRIX_FAMILIES = frozenset((MATMUL, CONV, ATTENTION))


class OpClass:
    MATMUL = "matmul"
    CONV = "conv"
    ATTENTION = "attention"  # a fused attention kernel
    SOFTMAX = "softmax"
    NORM = "norm"
    ACT = "act"
    EMBEDDING = "embedding"
    EMBEDDING_BAG = "embedding_bag"
    POOL = "pool"
    REDUCE = "reduce"
    CAT = "cat"
    ADD = "add"
    ELEMENTWISE = "elementwise"
    COPY = "copy"
    INDEX = "index"
    FACTORY = "factory"
    VIEW = "view"
    OTHER = "other"


_CLASSES: dict[str, tuple[str, ...]] = {
    OpClass.MATMUL: tuple(
        (
            "addmm mm bmm matmul linear baddbmm addbmm einsum _scaled_mm addmv mv dot vdot outer "
            "_addmm_activation _int_mm"
        ).split()
    ),
    OpClass.CONV: tuple(
        (
            "convolution _convolution conv1d conv2d conv3d conv_transpose1d conv_transpose2d "
            "conv_transpose3d cudnn_convolution mkldnn_convolution _slow_conv2d_forward "
            "slow_conv3d_forward thnn_conv2d cudnn_convolution_transpose convolution_overrideable "
            "_conv_depthwise2d convolution_backward"
        ).split()
    ),
    OpClass.ATTENTION: tuple(
        (
            "scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu "
            "_scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention "
            "_scaled_dot_product_cudnn_attention _scaled_dot_product_attention_math "
            "_efficient_attention_forward _flash_attention_forward "
            "_scaled_dot_product_fused_attention_overrideable _transformer_encoder_layer_fwd "
            "_native_multi_head_attention"
        ).split()
    ),
    OpClass.SOFTMAX: tuple(("softmax _softmax log_softmax _log_softmax _safe_softmax").split()),
    OpClass.NORM: tuple(
        (
            "native_layer_norm layer_norm native_batch_norm batch_norm _native_batch_norm_legit "
            "_native_batch_norm_legit_no_training _batch_norm_impl_index native_group_norm "
            "group_norm rms_norm _fused_rms_norm instance_norm cudnn_batch_norm "
            "_native_batch_norm_legit_functional"
        ).split()
    ),
    OpClass.ACT: tuple(
        (
            "relu relu_ gelu gelu_ silu silu_ tanh tanh_ sigmoid sigmoid_ hardtanh hardtanh_ "
            "leaky_relu leaky_relu_ elu elu_ mish hardswish hardswish_ hardsigmoid softplus relu6 "
            "prelu _prelu_kernel glu celu selu"
        ).split()
    ),
    OpClass.EMBEDDING: tuple(("embedding embedding_dense_backward").split()),
    OpClass.EMBEDDING_BAG: tuple(
        ("_embedding_bag embedding_bag _embedding_bag_forward_only").split()
    ),
    OpClass.POOL: tuple(
        (
            "max_pool2d max_pool2d_with_indices max_pool1d max_pool3d max_pool3d_with_indices "
            "avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d "
            "_adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool3d adaptive_max_pool2d"
        ).split()
    ),
    OpClass.REDUCE: tuple(
        (
            "mean sum amax amin max min var std var_mean prod norm linalg_vector_norm logsumexp "
            "argmax argmin all any cumsum std_mean cumprod count_nonzero topk sort"
        ).split()
    ),
    OpClass.CAT: tuple(("cat stack concat concatenate hstack vstack").split()),
    OpClass.ADD: tuple(("add add_").split()),
    OpClass.ELEMENTWISE: tuple(
        (
            "sub sub_ mul mul_ div div_ pow pow_ neg exp log sqrt rsqrt abs where masked_fill "
            "masked_fill_ clamp clamp_ clamp_min clamp_max minimum maximum eq ne lt le gt ge "
            "logical_not logical_and bitwise_not bitwise_and bitwise_or erf sin cos reciprocal "
            "floor ceil round sign addcmul addcdiv lerp rsub dropout native_dropout bernoulli_ "
            "square exp_ log1p expm1 remainder fmod floor_divide mul_scalar"
        ).split()
    ),
    OpClass.COPY: tuple(
        (
            "copy_ _to_copy clone contiguous to _copy_from copy constant_pad_nd pad repeat roll "
            "flip tril triu masked_scatter expand_copy permute_copy transpose_copy view_copy "
            "repeat_interleave lift_fresh_copy _local_scalar_dense resize_ set_"
        ).split()
    ),
    OpClass.INDEX: tuple(
        (
            "index index_select gather scatter scatter_ scatter_add scatter_add_ index_put "
            "index_put_ index_copy index_copy_ index_add index_add_ masked_select take "
            "slice_scatter select_scatter nonzero argsort searchsorted _index_put_impl_ "
            "scatter_reduce unique _unique2"
        ).split()
    ),
    OpClass.FACTORY: tuple(
        (
            "arange zeros ones full empty empty_strided randn rand randint zeros_like ones_like "
            "full_like empty_like rand_like randn_like scalar_tensor linspace eye lift_fresh "
            "normal_ uniform_ new_zeros new_ones new_empty new_full fill fill_ zero_"
        ).split()
    ),
}


_BY_NAME: dict[str, str] = {name: cls for cls, names in _CLASSES.items() for name in names}

#: The cost family of each class.
FAMILY_OF: dict[str, str] = {
    OpClass.MATMUL: MATMUL,
    OpClass.CONV: CONV,
    OpClass.ATTENTION: ATTENTION,
    OpClass.SOFTMAX: REDUCTION,
    OpClass.NORM: NORMALIZATION,
    OpClass.ACT: ELEMENTWISE,
    OpClass.EMBEDDING: EMBEDDING,
    OpClass.EMBEDDING_BAG: EMBEDDING,
    OpClass.POOL: REDUCTION,
    OpClass.REDUCE: REDUCTION,
    OpClass.CAT: DATA_MOVEMENT,
    OpClass.ADD: ELEMENTWISE,
    OpClass.ELEMENTWISE: ELEMENTWISE,
    OpClass.COPY: DATA_MOVEMENT,
    OpClass.INDEX: DATA_MOVEMENT,
    OpClass.FACTORY: DATA_MOVEMENT,
    OpClass.VIEW: VIEW,
    OpClass.OTHER: ELEMENTWISE,
}


def _by_pattern(name: str) -> str:
    """The class of an op the table does not name, from what its name says."""
    if "scaled_dot_product" in name or "flash_attention" in name:
        return OpClass.ATTENTION
    if "conv" in name:
        return OpClass.CONV
    if "norm" in name:
        return OpClass.NORM
    return OpClass.OTHER


def op_class(node: Node, name: str | None = None) -> str:
    """The fine class of a node's op (`name`: its base name, when the caller has it)."""
    name = node.name if name is None else name
    cls = _BY_NAME.get(name)
    if cls is not None:
        return cls
    if is_view(node):
        return OpClass.VIEW
    return _by_pattern(name)


_FAMILY_CACHE: dict[str, str] = {}
# Allocations that write nothing.
_UNINITIALISED = frozenset(("empty", "empty_like", "empty_strided", "new_empty", "empty_permuted"))


def op_family(op: str) -> str:
    """The family of an op by its qualified name (``aten::addmm.default`` -> ``matmul``);
    unknown ops count as elementwise, i.e. memory bound."""
    fam = _FAMILY_CACHE.get(op)
    if fam is None:
        name = op.split("::", 1)[-1].split(".", 1)[0]
        cls = _BY_NAME.get(name) or _BY_NAME.get(name.rstrip("_")) or _by_pattern(name)
        fam = _FAMILY_CACHE[op] = FAMILY_OF[cls]
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
    ref = (
        node.inputs[0]
        if (fam in MATRIX_FAMILIES and node.inputs)
        else (node.outputs[0] if node.outputs else (node.inputs[0] if node.inputs else None))
    )
    if (
        fam in (MATMUL,)
        and node.name in ("addmm", "baddbmm", "_addmm_activation")
        and len(node.inputs) > 1
    ):
        ref = node.inputs[1]
    dtype = ref.dtype if ref is not None else torch.float32
    return NodeCost(fam, flops, float(nbytes), dtype)
