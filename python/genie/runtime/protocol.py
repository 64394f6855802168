"""The genie wire protocol, version 2: frames, handshake, headers and their validation.

Note: [Wire format]
Every message is one frame (genie/runtime/transports/base.py): a 20-byte prefix
``!4sBBHIQ`` = (b"GNIE", protocol version, frame kind, 0, header length, payload length), a
header, and a payload of raw tensor bytes. Headers are msgpack maps with an explicit schema
(documented at each request below); torch objects inside node arguments travel as msgpack
extension types (``EXT_*``) whose payloads are names from fixed tables. Nothing is ever
pickled, and nothing from the wire is ever looked up with getattr on an arbitrary object.

Connection:
  server -> HELLO   header = 32 random bytes (the challenge)
  client -> AUTH    header = HMAC-SHA256(token, b"genie-auth-1" + challenge)   (32 bytes)
  server -> AUTH_OK header = b"" or AUTH_FAIL header = reason (utf-8), then closes
Only these fixed-size frames are read before the token is checked. Then REQUEST/REPLY frames
alternate, one reply per request:

  {"t": "hello"} -> {"device", "device_type", "protocol", "max_header", "max_message",
                     "memory_limit", "cuda_graphs", "session", "server"}
  {"t": "upload", "pre", "up": [[sid, nbytes, at, n, new], ...]}         payload: the n's
  {"t": "run", "pre", "up", "key": bin16, "prog": bin?, "bind": [sid...], "rng": [[i, bin]],
   "fetch": [REF...]?}  -> {"n": [nbytes or -1...]} with "fetch"    payload: the views' bytes
        (Note: [Outputs in the run's reply] in genie/runtime/server/session.py; since version 2)
  {"t": "eager", same as run, no "fetch"}  -> {"res": [result...]}  (results stay on the server)
  {"t": "fetch", "pre", "ref": REF}  -> {"n": nbytes}                     payload: the bytes
  {"t": "release", "pre", "ids": [sid...]}   (releases usually ride in "pre" instead)
  {"t": "stats", "pre"}  -> {"session": {...}, "server": {...}}
  {"t": "spec", "pre", "key": bin16, "bind": [sid or None...]}
        -> {"spec": true} or {"spec": false, "why": str}; the next request resolves it: the
        run it predicted -> {"spec": "hit"} (Note: [Speculative runs] in genie/runtime/server/speculation.py)
  {"t": "bye"}
``pre`` is a list of deferred control operations applied first: ``["release", [sid...]]`` and
``["bind", pending, REF]``. ``REF`` = ``[sid, dtype, shape, stride, offset, storage_nbytes]``.
Replies are ``{"ok": true, ...}`` or ``{"ok": false, "kind": str, "msg": str}``.

Note: [Payloads land in place]
A header announces the payload's layout before the payload is read, so the receiver allocates
the destination (a tensor's storage on the server, the result tensor on the client) and the
transport receives into it directly: no intermediate buffer, no join.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from genie.errors import ProtocolError, RemoteError, TransportError
from genie.graph.ir import TensorMeta
from genie.runtime.transports.base import Transport

__all__ = [
    "PROTOCOL_VERSION",
    "Limits",
    "ProgramRef",
    "client_handshake",
    "decode_ref",
    "decode_ref_extent",
    "encode_ref",
    "pack",
    "resolve_token",
    "server_handshake",
    "unpack",
]

PROTOCOL_VERSION = 2  # 2: a run carries the fetches it answers
EMPTY_UPLOAD = ["up", 0]  # a "spec" binding entry: an empty storage the run will upload

# frame kinds
HELLO, AUTH, AUTH_OK, AUTH_FAIL, REQUEST, REPLY = 1, 2, 3, 4, 5, 6

_CHALLENGE_BYTES = 32
_AUTH_CONTEXT = b"genie-auth-1"

# msgpack extension codes for torch objects inside node arguments
EXT_DTYPE, EXT_DEVICE, EXT_LAYOUT, EXT_MEMORY_FORMAT, EXT_COMPLEX = 1, 2, 3, 4, 5

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "complex64", "complex128",
        "int64", "int32", "int16", "int8", "uint8", "bool",
        "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}  # fmt: skip
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in _DTYPES.items()}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_LAYOUT_NAMES = {v: k for k, v in _LAYOUTS.items()}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}
_MEMORY_FORMAT_NAMES = {v: k for k, v in _MEMORY_FORMATS.items()}
_REMOTE_TYPE = "remote_accelerator"

_MAX_DIMS = 64
_MAX_EXTENT = 1 << 50  # sizes, strides, offsets: far beyond any real tensor, well inside int64
_MAX_SID = (1 << 63) - 1


@dataclass(frozen=True)
class Limits:
    """Bounds the server enforces on what a client may send."""

    max_header: int = 64 << 20
    max_message: int = 1 << 30  # payload bytes per frame
    max_storage: int = 64 << 30  # bytes of one storage
    memory_limit: int = 0  # resident bytes per session, 0 = no limit
    max_nodes: int = 200_000
    max_list: int = 1 << 16
    max_str: int = 1024

    def as_dict(self) -> dict[str, int]:
        return {
            "max_header": self.max_header,
            "max_message": self.max_message,
            "max_storage": self.max_storage,
            "memory_limit": self.memory_limit,
        }


# -- msgpack ------------------------------------------------------------------------------
def _default(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return msgpack.ExtType(EXT_DTYPE, _DTYPE_NAMES[v].encode())
    if isinstance(v, torch.device):
        name = "remote" if v.type == _REMOTE_TYPE else v.type
        return msgpack.ExtType(EXT_DEVICE, name.encode())
    if isinstance(v, torch.layout):
        return msgpack.ExtType(EXT_LAYOUT, _LAYOUT_NAMES[v].encode())
    if isinstance(v, torch.memory_format):
        return msgpack.ExtType(EXT_MEMORY_FORMAT, _MEMORY_FORMAT_NAMES[v].encode())
    if isinstance(v, complex):
        return msgpack.ExtType(EXT_COMPLEX, struct.pack("!dd", v.real, v.imag))
    if isinstance(v, torch.Generator):
        return None  # replay draws from the recorded generator state, never from this object
    raise TypeError(f"genie: cannot send a {type(v).__name__} argument to a genie server")


def pack(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)
    except (TypeError, KeyError, OverflowError, ValueError) as e:
        raise ProtocolError(f"genie: cannot encode a message: {e}") from e


def _ext_hook(code: int, data: bytes) -> Any:
    try:
        text = data.decode() if code != EXT_COMPLEX else ""
    except UnicodeDecodeError:
        raise ProtocolError("genie: bad extension value") from None
    if code == EXT_DTYPE and text in _DTYPES:
        return _DTYPES[text]
    if code == EXT_DEVICE:
        if text == "remote":
            # Replay swaps it for the server's device (genie.runtime.replay._swap_device).
            return torch.device(_REMOTE_TYPE, 0)
        if text == "cpu":
            return torch.device("cpu")
    if code == EXT_LAYOUT and text in _LAYOUTS:
        return _LAYOUTS[text]
    if code == EXT_MEMORY_FORMAT and text in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[text]
    if code == EXT_COMPLEX and len(data) == 16:
        re, im = struct.unpack("!dd", data)
        return complex(re, im)
    raise ProtocolError(f"genie: unknown extension value (code {code})")


def unpack(data: bytes, limits: Limits | None = None) -> Any:
    """Decode a header; any malformation raises ProtocolError."""
    lim = limits or Limits()
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_ext_hook,
            max_str_len=min(len(data), 1 << 24),
            max_bin_len=min(len(data), lim.max_header),
            max_array_len=min(len(data), lim.max_nodes * 8),
            max_map_len=min(len(data), 64),
            max_ext_len=min(len(data), 64),
        )
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises many kinds; all mean "malformed"
        raise ProtocolError(f"genie: malformed message header: {type(e).__name__}: {e}") from None


# -- field checks -------------------------------------------------------------------------
def need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(f"genie: invalid request: {what}")


def get_int(v: Any, lo: int, hi: int, what: str) -> int:
    need(type(v) is int and lo <= v <= hi, f"{what} must be an integer in [{lo}, {hi}]")
    return v


def get_bool(v: Any, what: str) -> bool:
    need(type(v) is bool, f"{what} must be a boolean")
    return v


def get_list(v: Any, what: str, max_len: int) -> list:
    need(type(v) is list and len(v) <= max_len, f"{what} must be a list of at most {max_len} items")
    return v


def get_map(v: Any, what: str) -> dict:
    need(type(v) is dict, f"{what} must be a map")
    return v


def get_bytes(v: Any, what: str, max_len: int) -> bytes:
    need(
        type(v) is bytes and len(v) <= max_len, f"{what} must be binary of at most {max_len} bytes"
    )
    return v


def get_sid(v: Any, what: str = "storage id") -> int:
    return get_int(v, 0, _MAX_SID, what)


def get_sids(v: Any, what: str, max_len: int) -> list[int]:
    """A list of storage ids (the common all-valid case checked at C level)."""
    ids = get_list(v, what, max_len)
    plain_ints = all(map(int.__instancecheck__, ids)) and not any(map(bool.__instancecheck__, ids))
    if plain_ints and (not ids or (min(ids) >= 0 and max(ids) <= _MAX_SID)):
        return ids
    return [get_sid(i) for i in ids]  # the first bad id raises its own error


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"genie: dtype {dtype} cannot travel to a genie server") from None


def get_dtype(v: Any) -> torch.dtype:
    need(type(v) is str and v in _DTYPES, f"unknown dtype {v!r}")
    return _DTYPES[v]


def itemsize(dtype: torch.dtype) -> int:
    return _ITEMSIZE[_DTYPE_NAMES[dtype]]


def extent(shape: tuple[int, ...], stride: tuple[int, ...], offset: int, size: int) -> int:
    """Bytes of storage a view needs: 0 for an empty view."""
    if any(s == 0 for s in shape):
        return 0
    last = offset + sum((s - 1) * st for s, st in zip(shape, stride, strict=True))
    return (last + 1) * size


# -- tensor references --------------------------------------------------------------------
def encode_ref(ref: dict, storage: int | None = None) -> list:
    """A core ref dict (TensorMeta.from_core's input) -> REF; `storage` replaces its id."""
    return [
        ref["storage"] if storage is None else storage,
        dtype_name(ref["dtype"]),
        list(ref["shape"]),
        list(ref["stride"]),
        int(ref["offset"]),
        int(ref["storage_nbytes"]),
    ]


def _ints_in(xs: list, hi: int) -> bool:
    for x in xs:
        if type(x) is not int or x < 0 or x > hi:
            return False
    return True


def decode_ref(v: Any, limits: Limits, *, max_sid: int = _MAX_SID) -> TensorMeta:
    """REF -> TensorMeta, checking that the view lies inside its declared storage."""
    return decode_ref_extent(v, limits, max_sid=max_sid)[0]


def decode_ref_extent(v: Any, limits: Limits, *, max_sid: int = _MAX_SID) -> tuple[TensorMeta, int]:
    """decode_ref, and the bytes of storage the view needs (extent()). (Written for speed: a
    program's validation spends most of its time here; messages are built only on failure.)"""
    if not (type(v) is list and len(v) == 6):
        need(False, "a tensor reference must be a list of 6 fields")
    sid, name, shape, stride, offset, nbytes = v
    if not (type(sid) is int and 0 <= sid <= max_sid):
        need(False, f"tensor reference id must be in [0, {max_sid}]")
    dtype = _DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        need(False, f"unknown dtype {name!r}")
    if not (
        type(shape) is list and type(stride) is list and len(shape) == len(stride) <= _MAX_DIMS
    ):
        need(False, "shape and stride must be lists of the same length")
    if not (_ints_in(shape, _MAX_EXTENT) and _ints_in(stride, _MAX_EXTENT)):
        need(False, "sizes and strides must be in range")
    if not (type(offset) is int and 0 <= offset <= _MAX_EXTENT):
        need(False, "storage offset out of range")
    if not (type(nbytes) is int and 0 <= nbytes <= limits.max_storage):
        need(False, f"storage size must be in [0, {limits.max_storage}]")
    numel, last = 1, offset
    for sz, st in zip(shape, stride, strict=True):
        numel *= sz
        last += (sz - 1) * st
    if numel > _MAX_EXTENT:
        need(False, "a tensor's element count is out of range")
    used = 0 if numel == 0 else (last + 1) * _ITEMSIZE[name]
    if used > nbytes:
        need(
            False,
            f"a {name}{shape} view (stride {stride}, offset {offset}) does not fit in its "
            f"{nbytes}-byte storage",
        )
    return TensorMeta(sid, dtype, tuple(shape), tuple(stride), offset, nbytes), used


# -- handshake ----------------------------------------------------------------------------
def _mac(token: bytes, challenge: bytes) -> bytes:
    return hmac.new(token, _AUTH_CONTEXT + challenge, hashlib.sha256).digest()


def server_handshake(t: Transport, token: bytes) -> bool:
    """Challenge the client; True when it proved it knows the token. Reads nothing but the
    fixed-size AUTH frame before deciding."""
    challenge = os.urandom(_CHALLENGE_BYTES)
    t.send_frame(PROTOCOL_VERSION, HELLO, challenge)
    try:
        frame = t.recv_frame(max_header=64)
    except ProtocolError as e:
        _refuse(t, str(e))
        return False
    if frame.version != PROTOCOL_VERSION:
        _refuse(
            t,
            f"protocol version {frame.version} is not supported (server speaks {PROTOCOL_VERSION})",
        )
        return False
    ok = (
        frame.kind == AUTH
        and frame.payload_len == 0
        and hmac.compare_digest(frame.header, _mac(token, challenge))
    )
    if not ok:
        _refuse(t, "authentication failed: wrong or missing token")
        return False
    t.send_frame(PROTOCOL_VERSION, AUTH_OK, b"")
    return True


def _refuse(t: Transport, reason: str) -> None:
    try:
        t.send_frame(PROTOCOL_VERSION, AUTH_FAIL, reason.encode()[:512])
    except TransportError:
        pass


def client_handshake(t: Transport, token: bytes) -> None:
    frame = t.recv_frame(max_header=64)
    if frame.kind != HELLO or len(frame.header) != _CHALLENGE_BYTES:
        raise ProtocolError(f"genie: {t.peer} is not a genie server (unexpected greeting)")
    if frame.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"genie: the server at {t.peer} speaks protocol {frame.version}, this client "
            f"{PROTOCOL_VERSION}; install the same genie version on both sides"
        )
    t.send_frame(PROTOCOL_VERSION, AUTH, _mac(token, frame.header))
    reply = t.recv_frame(max_header=1024)
    if reply.kind != AUTH_OK:
        reason = reply.header.decode(errors="replace") or "refused"
        raise RemoteError(
            f"genie: the server at {t.peer} refused this client ({reason}); set GENIE_TOKEN "
            "(or pass token= to genie.connect) to the token the server was started with"
        )


def resolve_token(token: str | bytes | None = None, token_file: str | None = None) -> bytes | None:
    """The one token resolver, for clients, topologies and ``genie serve``: `token` as given,
    else the contents of `token_file`, else ``$GENIE_TOKEN``, else the contents of the file
    ``$GENIE_TOKEN_FILE``; None when none is set."""
    if token is not None:
        return token.encode() if isinstance(token, str) else bytes(token)
    path = token_file
    if path is None:
        env = os.environ.get("GENIE_TOKEN")
        if env:
            return env.encode()
        path = os.environ.get("GENIE_TOKEN_FILE")
    if path:
        with open(path, "rb") as f:
            return f.read().strip()
    return None


# -- naming a program ---------------------------------------------------------------------
# Note: [Program refs]
# A run (or eager, or spec) request names its program in one of three ways, all carried by
# the same header fields: by its key alone ("key": a program the server has), by its body
# ("key" + "prog": the server checks it and keeps it), or as a patch of a base the server has
# ("key" + "base" + "patch": Note: [Program patches], or an instance of a template, Note:
# [Program instances]). A ProgramRef is that naming, built by the client's ProgramNamer and
# resolved by the server's ProgramResolver; the rest of a request does not care which it is.
@dataclass(frozen=True)
class ProgramRef:
    key: bytes
    body: bytes | None = None
    base: bytes | None = None
    patch: list | None = None

    def fields(self) -> dict[str, Any]:
        """The header fields that name the program."""
        out: dict[str, Any] = {"key": self.key}
        if self.body is not None:
            out["prog"] = self.body
        if self.base is not None:
            out["base"], out["patch"] = self.base, self.patch
        return out

    @classmethod
    def of(cls, req: dict, limits: Limits) -> ProgramRef:
        """The program a request names, its fields checked for type and size."""
        key = get_bytes(req.get("key"), "program key", 16)
        need(len(key) == 16, "a program key has 16 bytes")
        body = req.get("prog")
        if body is not None:
            body = get_bytes(body, "program", limits.max_header)
        base = req.get("base")
        if base is not None:
            return cls(key, body, get_bytes(base, "base program key", 16),
                       get_list(req.get("patch"), "patch", limits.max_list))  # fmt: skip
        return cls(key, body)


# -- replies ------------------------------------------------------------------------------
def error_reply(kind: str, message: str) -> dict:
    return {"ok": False, "kind": kind, "msg": message}
