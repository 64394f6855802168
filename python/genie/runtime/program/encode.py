"""The client's side of Note: [Programs and bindings] (program/__init__.py): a flush's core
node dicts -> program bytes, their key, and the binding."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from genie.graph.ir import TensorMeta
from genie.runtime import protocol as P

__all__ = ["EncodedProgram", "encode_program", "encoded_meta", "program_key", "KIND_CODES"]

# How an argument travels: [kind, value]; tensors as indices into the node's inputs.
KIND_CODES = {"value": 0, "tensor": 1, "tensor_list": 2, "optional_tensor_list": 3}
KIND_NAMES = {v: k for k, v in KIND_CODES.items()}


@dataclass
class EncodedProgram:
    body: bytes
    key: bytes
    binding: list[int]
    rng: list[list]
    fresh: dict[int, int]  # storage id -> bytes, for storages this flush creates
    nodes: list[list]  # the program before packing, for patches
    signature: tuple  # the op sequence: programs that share it are patched, not resent


def program_key(body: bytes) -> bytes:
    """The 16-byte key a program is known by: the hash of its bytes."""
    return hashlib.blake2b(body, digest_size=16).digest()


def encode_program(nodes: list[dict]) -> EncodedProgram:
    """Core node dicts (the recorder's flush) -> program bytes, key and binding."""
    local: dict[int, int] = {}
    binding: list[int] = []
    dtype_names: dict[torch.dtype, str] = {}

    def loc(s: int) -> int:
        i = local.get(s)
        if i is None:
            i = local[s] = len(binding)
            binding.append(s)
        return i

    def ref(r: dict) -> list:
        dt = r["dtype"]
        name = dtype_names.get(dt)
        if name is None:
            name = dtype_names[dt] = P.dtype_name(dt)
        return [loc(r["storage"]), name, r["shape"], r["stride"], r["offset"], r["storage_nbytes"]]

    body_nodes = []
    rng: list[list] = []
    fresh: dict[int, int] = {}
    for k, d in enumerate(nodes):
        ins = [ref(r) for r in d["inputs"]]
        # An undefined tensor result (alias -2, e.g. a gradient nobody asked for) travels as None.
        outs = [
            None if a == -2 else ref(r)
            for r, a in zip(d["outputs"], d["output_alias"], strict=True)
        ]
        args = [[KIND_CODES[kind], v] for kind, v in d["args"]]
        random = bool(d["random"])
        body_nodes.append(
            [
                d["op"],
                args,
                ins,
                outs,
                d["output_alias"],
                [loc(s) for s in d["writes"]],
                [loc(s) for s in d["fresh"]],
                random,
            ]
        )
        state = d.get("rng_state")
        if random and state is not None:
            rng.append([k, state.numpy().tobytes()])
        for r, alias in zip(d["outputs"], d["output_alias"], strict=False):
            if alias == -1:
                fresh[r["storage"]] = r["storage_nbytes"]
    body = P.pack(body_nodes)
    signature = tuple(n[0] for n in body_nodes)
    return EncodedProgram(body, program_key(body), binding, rng, fresh, body_nodes, signature)


def encoded_meta(m: TensorMeta) -> list:
    return [
        m.storage,
        P.dtype_name(m.dtype),
        list(m.shape),
        list(m.stride),
        m.offset,
        m.storage_nbytes,
    ]
