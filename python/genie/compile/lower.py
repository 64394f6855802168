"""An aten FX graph (what AOT autograd hands a compiler) -> one Genie program, recorded once.

Note: [Lowering by recording]
The graph is not translated op by op: it is *run once* on ``remote_accelerator`` tensors, so
the recorder (csrc/capture) writes exactly the node dicts a lazy flush would (the same argument
encoding, output metadata from the shape cache, views as geometry rather than nodes), and
``encode_program`` turns them into the wire program every executor already validates. Each
tensor argument is moved to the device as a fresh, densely laid out copy, so it becomes one
recorder constant with a storage of its own; the program reads it as an input. CPU tensors the
graph makes itself (constants AOT lifted) become constants of the program, uploaded once.
Devices named in the graph (``device=cpu`` of a factory, ``_assert_tensor_metadata``) are
rewritten to the remote device first, so that factories are recorded rather than run here.
Random steps (dropout in training) get fresh generator states at each call, drawn from
torch's default generator (Note: [Random steps of compiled programs] in targets.py).
Nothing of the recording runs: its nodes are dead once the remote tensors go out of scope, and
the flush that follows the lowering drops them with their constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from genie import _C
from genie.runtime import protocol as P
from genie.runtime.program import EncodedProgram, Program, decode_program, encode_program

__all__ = ["InputSpec", "Lowered", "Output", "lower", "dense_copy"]

REMOTE = "remote_accelerator:0"
_LIMITS = P.Limits()


@dataclass(frozen=True)
class InputSpec:
    """The layout a tensor argument is recorded with: storage offset 0, `stride` dense; or,
    for a tensor a target keeps (Note: [Saved tensors stay on the server] in targets.py), its
    own view of its own storage (`offset`, `storage` bytes)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0
    storage: int = 0  # bytes of a kept tensor's storage; 0: the view's extent
    kept: bool = False

    @classmethod
    def of(cls, t: torch.Tensor) -> InputSpec:
        stride = tuple(t.stride())
        if not torch._prims_common.is_non_overlapping_and_dense_or_false(t):
            stride = tuple(torch.empty(t.shape, device="meta").stride())
        return cls(tuple(t.shape), stride, t.dtype)

    @classmethod
    def kept_view(cls, t: torch.Tensor) -> InputSpec:
        return cls(
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            t.storage_offset(),
            t.untyped_storage().nbytes(),
            kept=True,
        )

    def fits(self, t: torch.Tensor, nbytes: int) -> bool:
        """`t` can be used as it is (no copy): same layout, offset 0, storage large enough."""
        return (
            t.storage_offset() == self.offset
            and tuple(t.stride()) == self.stride
            and t.untyped_storage().nbytes() >= nbytes
        )


def dense_copy(t: torch.Tensor, spec: InputSpec, device: torch.device | str = "cpu"):
    """`t`'s values in a storage of exactly the recorded layout."""
    out = torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device=device)
    with torch.no_grad():
        out.copy_(t.detach())
    return out


@dataclass(frozen=True)
class Output:
    """How one graph output is made after a run: fetched from a local of the program
    ("ref"), a view of a tensor argument ("arg"), a CPU tensor the graph made ("cpu") or a
    plain value ("value")."""

    kind: str
    local: int = -1
    ref: dict | None = None  # the core ref, its storage a local index
    arg: int = -1
    value: Any = None


@dataclass
class Lowered:
    """One recorded program and how a call's arguments and results map onto it."""

    enc: EncodedProgram
    program: Program  # decoded and checked here, as a server would
    inputs: list[tuple[int, int, InputSpec, int]]  # (argument, local, layout, storage bytes)
    constants: list[tuple[int, torch.Tensor]]  # (local, recorder constant): uploaded once
    outputs: list[Output]
    writes: list[tuple[int, dict]]  # (argument, ref): arguments the program writes
    container: type = tuple
    nbytes: dict[int, int] = field(default_factory=dict)  # local -> storage bytes


def _on_remote(gm: torch.fx.GraphModule) -> None:
    """Rewrite the CPU devices the graph names to the remote device (Note: [Lowering by
    recording])."""
    remote = torch.device(REMOTE)

    def swap(v):
        return remote if isinstance(v, torch.device) and v.type == "cpu" else v

    changed = False
    for node in gm.graph.nodes:
        args = torch.fx.node.map_aggregate(node.args, swap)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs, changed = args, kwargs, True
    changed |= _sdpa_for_the_target(gm)
    if changed:
        gm.recompile()


# Note: [Attention chosen for the target]
# AOT autograd traces on the caller's CPU tensors, so scaled_dot_product_attention arrives as
# the CPU's fused kernel, _scaled_dot_product_flash_attention_for_cpu, which a CUDA server has
# no kernel for. Where only its output is read (no backward needs the log-sum-exp) and nothing
# is dropped out, the node goes back to scaled_dot_product_attention, so that recording picks
# the kernel as lazy capture does, for the recorder's target device type (capture/registration
# .cpp, sdp_choice): the same kernel on a CPU target; on a CUDA one what the client's GPU would
# pick, or the math path where the client has no GPU to ask. A recorder whose target is the CPU
# (a CPU-only client whose session is not installed) still records the CPU kernel. A training
# graph keeps the CPU kernel and its backward. Not yet run on a GPU.
def _sdpa_for_the_target(gm: torch.fx.GraphModule) -> bool:
    import operator

    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not cpu_sdpa:
            continue
        users = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        q, k, v, *rest = node.args
        dropout = rest[0] if rest else node.kwargs.get("dropout_p", 0.0)
        causal = rest[1] if len(rest) > 1 else node.kwargs.get("is_causal", False)
        if dropout != 0.0:
            continue
        kwargs = {
            "attn_mask": node.kwargs.get("attn_mask"),
            "is_causal": causal,
            "scale": node.kwargs.get("scale"),
        }
        with gm.graph.inserting_before(node):
            sdpa = gm.graph.call_function(
                torch.ops.aten.scaled_dot_product_attention.default, (q, k, v), kwargs
            )
        for u in users:
            u.replace_all_uses_with(sdpa)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _remote_input(t: torch.Tensor, moved: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """`t`'s view of its storage on the remote device, the storage one recorder constant:
    moved as a flat tensor, then viewed with `t`'s strides and offset. (``.to()`` of a
    strided tensor would record a copy out of a contiguous constant instead.) `moved`: the
    storages moved so far by their host address, so that views of one storage stay views of
    one constant (a forward may save two views of one activation for backward)."""
    st = t.untyped_storage()
    flat = None if moved is None else moved.get(st.data_ptr())
    if flat is None:
        flat = torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,)).to(REMOTE)
        if moved is not None:
            moved[st.data_ptr()] = flat
    return flat.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())


def _refs(nodes: list[dict]):
    for d in nodes:
        yield from d["inputs"]
        yield from d["outputs"]


def lower(gm: torch.fx.GraphModule, args: list[Any], kept: frozenset[int] = frozenset()) -> Lowered:
    """Record `gm` on `args` (real tensors: their shapes, strides and dtypes are what the
    program is for) and encode it (Note: [Lowering by recording]). `kept`: the arguments a
    target holds as they are (their own geometry is recorded)."""
    _on_remote(gm)
    before = {d["id"] for d in _C._pending_nodes()}
    flushes = _C._stats()["flushes"]
    remote_args: list[Any] = []
    arg_of: dict[int, int] = {}  # recorder storage id -> argument index
    specs: dict[int, InputSpec] = {}
    moved: dict[int, torch.Tensor] = {}  # kept storages, by host address
    with torch.no_grad():
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if i in kept:
                    specs[i] = InputSpec.kept_view(a)
                    r = _remote_input(a, moved)
                else:
                    specs[i] = InputSpec.of(a)
                    r = _remote_input(dense_copy(a, specs[i]))
                arg_of[_C._storage_id(r)] = i
                remote_args.append(r)
            else:
                remote_args.append(a)
        result = gm(*remote_args)
    if _C._stats()["flushes"] != flushes:
        raise NotImplementedError(
            "genie.compile: the graph needs a value on the host while it runs (an op whose "
            "output shape depends on data, or .item()); compile with a graph break there "
            "(torch._dynamo.config.capture_scalar_outputs=False, the default) or use lazy "
            "capture (.to('remote_accelerator:0')) for this model"
        )
    nodes = [d for d in _C._pending_nodes() if d["id"] not in before]
    pending = _C._pending_constants()
    enc = encode_program(nodes)
    program = decode_program(enc.body, _LIMITS, enc.key)  # the allow-list, checked here first
    local_of = {sid: k for k, sid in enumerate(enc.binding)}
    nbytes: dict[int, int] = {}
    for r in _refs(nodes):
        k = local_of.get(r["storage"])
        if k is not None:
            nbytes[k] = max(nbytes.get(k, 0), int(r["storage_nbytes"]))
    inputs, constants = [], []
    for k in program.inputs:
        sid = enc.binding[k]
        if sid in arg_of:
            i = arg_of[sid]
            inputs.append((i, k, specs[i], nbytes.get(k, 0)))
        elif sid in pending:
            constants.append((k, pending[sid]))  # its storage's bytes, as recorded
        else:
            raise NotImplementedError(
                "genie.compile: the graph reads a remote_accelerator tensor it was not given "
                "as an argument (a tensor created by lazy capture and closed over); pass CPU "
                "tensors to a model compiled with backend='genie'"
            )
    arg_local = {k: i for i, k, _, _ in inputs}
    writes = []
    for d in nodes:
        for sid in d["writes"]:
            k = local_of[sid]
            if k in arg_local and all(w[0] != arg_local[k] for w in writes):
                i = arg_local[k]
                s = specs[i]
                ref = _ref(k, s.dtype, s.shape, s.stride, 0, nbytes[k])
                writes.append((i, ref))
    outputs = [
        _output(o, local_of, arg_of, nbytes) for o in (result if _is_seq(result) else [result])
    ]
    container = type(result) if _is_seq(result) else None
    return Lowered(enc, program, inputs, constants, outputs, writes, container, nbytes)


def _is_seq(v: Any) -> bool:
    return isinstance(v, (tuple, list))


def _ref(local: int, dtype, shape, stride, offset: int, nbytes: int) -> dict:
    return {
        "storage": local,
        "dtype": dtype,
        "shape": list(shape),
        "stride": list(stride),
        "offset": int(offset),
        "storage_nbytes": int(nbytes),
    }


def _output(o: Any, local_of: dict, arg_of: dict, nbytes: dict) -> Output:
    if not isinstance(o, torch.Tensor):
        if isinstance(o, torch.SymInt | torch.SymFloat | torch.SymBool):
            raise NotImplementedError("genie.compile: a symbolic value as a graph output")
        return Output("value", value=o)
    if o.device.type != "remote_accelerator":
        return Output("cpu", value=o.detach().clone())
    sid = _C._storage_id(o)
    k = local_of.get(sid)
    if sid in arg_of:  # a view of an argument stays one
        ref = _ref(-1, o.dtype, o.shape, o.stride(), o.storage_offset(), 0)
        return Output("arg", arg=arg_of[sid], ref=ref)
    if k is None:
        raise NotImplementedError(
            "genie.compile: a graph output that the program neither computes nor was given"
        )
    ref = _ref(k, o.dtype, o.shape, o.stride(), o.storage_offset(), nbytes[k])
    return Output("ref", local=k, ref=ref)
