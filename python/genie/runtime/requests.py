"""Typed requests: what each request a client sends says, checked once where it arrives.

A request crosses the wire as a msgpack map whose "t" names its type (Note: [Wire format] in
protocol.py). Each type here is a dataclass: the client builds one and sends ``header()``;
the server's Session turns the map it received into one with ``parse_request`` and hands it
to the handler for its type. ``parse`` checks what can be checked without the session's
state: field types, ranges against the server's Limits, list lengths. What depends on state
(is a storage resident, does a binding fit its program) is the handler's to check.

A run, an eager node and a speculative run name their program by one ``ProgramRef`` (Note:
[Program refs]). Deferred operations (releases, binds of eager results) ride on any request
as its ``pre`` and are parsed with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from genie.errors import ProtocolError
from genie.graph.ir import TensorMeta
from genie.runtime import protocol as P

__all__ = [
    "Bind",
    "Bye",
    "Eager",
    "Fetch",
    "Hello",
    "PeerClose",
    "PeerOpen",
    "PeerRecv",
    "PeerSend",
    "Piece",
    "Release",
    "Request",
    "Run",
    "Spec",
    "Stats",
    "Upload",
    "parse_pieces",
    "pieces_of",
    "parse_pre",
    "parse_request",
]

_MAX_TAG = (1 << 31) - 1
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Piece(NamedTuple):
    """One piece of an upload: bytes [at, at + n) of storage `sid`, `nbytes` long; `new`
    when this piece starts the storage (Note: [Large uploads] in remote/uploads.py)."""

    sid: int
    nbytes: int
    at: int
    n: int
    new: bool

    def wire(self) -> list:
        return list(self)

    @classmethod
    def parse(cls, v: Any, limits: P.Limits) -> Piece:
        P.need(type(v) is list and len(v) == 5, "an upload must be [id, nbytes, at, n, new]")
        sid = P.get_sid(v[0])
        nbytes = P.get_int(v[1], 0, limits.max_storage, "upload storage size")
        at = P.get_int(v[2], 0, nbytes, "upload offset")
        n = P.get_int(v[3], 0, nbytes - at, "upload length")
        return cls(sid, nbytes, at, n, P.get_bool(v[4], "upload new"))


def pieces_of(parts: list[tuple[list, Any]]) -> list[Piece]:
    """The pieces of ``(entry, view)`` pairs as remote/uploads.py cuts them."""
    return [Piece(*entry) for entry, _ in parts]


def parse_pieces(v: Any, limits: P.Limits) -> list[Piece]:
    return [Piece.parse(e, limits) for e in P.get_list(v or [], "uploads", limits.max_list)]


def _group(v: Any) -> str:
    P.need(
        type(v) is str and _GROUP_NAME.fullmatch(v) is not None,
        "a peer group name is 1-64 letters, digits, '-' or '_'",
    )
    return v


# -- deferred operations ------------------------------------------------------------------
@dataclass(frozen=True)
class Bind:
    """Bind pending eager result `pending` to the storage and view `ref` describes."""

    pending: int
    ref: list  # protocol.encode_ref's form

    def wire(self) -> list:
        return ["bind", self.pending, self.ref]


def parse_pre(v: Any, limits: P.Limits) -> list[list[int] | tuple[int, TensorMeta]]:
    """A request's deferred operations, in order: a list of storage ids to release, or
    (pending result, where to bind it)."""
    out: list[list[int] | tuple[int, TensorMeta]] = []
    if v is None:
        return out
    for op in P.get_list(v, "pre", limits.max_list):
        P.need(type(op) is list and len(op) >= 2, "a deferred operation must be a list")
        if op[0] == "release":
            out.append(P.get_sids(op[1], "release ids", limits.max_list))
        elif op[0] == "bind" and len(op) == 3:
            pid = P.get_int(op[1], 0, P._MAX_SID, "pending result")
            out.append((pid, P.decode_ref(op[2], limits)))
        else:
            raise ProtocolError(
                f"genie: invalid request: unknown deferred operation {str(op[0])[:40]!r}"
            )
    return out


# -- requests -----------------------------------------------------------------------------
@dataclass
class Request:
    """A request; subclasses name their wire type in `kind`."""

    kind: ClassVar[str] = ""
    payload: ClassVar[bool] = False  # whether the frame may carry payload bytes

    def fields(self) -> dict[str, Any]:
        return {}

    def header(self) -> dict[str, Any]:
        """The map the client sends."""
        return {"t": self.kind, **self.fields()}

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> Request:
        return cls()


@dataclass
class Hello(Request):
    kind: ClassVar[str] = "hello"


@dataclass
class Stats(Request):
    kind: ClassVar[str] = "stats"


@dataclass
class Bye(Request):
    kind: ClassVar[str] = "bye"


@dataclass
class Upload(Request):
    """Pieces of storages; the frame's payload is their bytes, in order."""

    kind: ClassVar[str] = "upload"
    payload: ClassVar[bool] = True
    pieces: list[Piece] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {"up": [p.wire() for p in self.pieces]}

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> Upload:
        return cls(parse_pieces(req.get("up"), limits))


@dataclass
class Run(Request):
    """Run the program `program` names with `bind` (storage id per program local) and `rng`
    (generator states of its random steps), after uploading `pieces`. The binding's fit to
    the program is checked by program/run.py's check_binding, which knows the program.
    `fetch`: views whose bytes the reply carries once the run is done (Note: [Outputs in the
    run's reply] in server/session.py); the client's encoded refs, the server's TensorMeta."""

    kind: ClassVar[str] = "run"
    payload: ClassVar[bool] = True
    program: P.ProgramRef = field(default_factory=lambda: P.ProgramRef(b""))
    bind: list = field(default_factory=list)
    rng: list = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    fetch: list = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        out = {**self.program.fields(), "bind": self.bind, "rng": self.rng}
        out["up"] = [p.wire() for p in self.pieces]
        if self.fetch:
            out["fetch"] = self.fetch
        return out

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> Run:
        fetch = P.get_list(req.get("fetch") or [], "fetch", limits.max_list)
        return cls(
            P.ProgramRef.of(req, limits),
            P.get_list(req.get("bind"), "binding", limits.max_list),
            P.get_list(req.get("rng") or [], "rng", limits.max_list),
            parse_pieces(req.get("up"), limits),
            [P.decode_ref(r, limits) for r in fetch],
        )


@dataclass
class Eager(Run):
    """Run one node and answer its results (kept pending until bound or dropped)."""

    kind: ClassVar[str] = "eager"

    def fields(self) -> dict[str, Any]:
        out = super().fields()
        if not self.pieces:  # an eager node never uploads: no empty list on the wire
            del out["up"]
        return out


@dataclass
class Spec(Request):
    """Start the program `program` names now, with `bind` (an id, None for a storage it
    creates, or protocol.EMPTY_UPLOAD for an input the next run uploads), unanswered until
    the next request (Note: [Speculative runs] in server/speculation.py)."""

    kind: ClassVar[str] = "spec"
    program: P.ProgramRef = field(default_factory=lambda: P.ProgramRef(b""))
    bind: list = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {**self.program.fields(), "bind": self.bind}

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> Spec:
        bind = P.get_list(req.get("bind"), "binding", limits.max_list)
        for b in bind:
            if b is not None and b != P.EMPTY_UPLOAD:
                P.get_sid(b)
        return cls(P.ProgramRef.of(req, limits), bind)


@dataclass
class Fetch(Request):
    """Send back the bytes of the view `ref` describes."""

    kind: ClassVar[str] = "fetch"
    ref: TensorMeta | None = None
    wire_ref: list | None = None  # the client's encoded form

    def fields(self) -> dict[str, Any]:
        return {"ref": self.wire_ref}

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> Fetch:
        return cls(P.decode_ref(req.get("ref"), limits))


@dataclass
class Release(Request):
    """Free these storages (usually empty: releases ride on ``pre``, and this request only
    carries them when the client has many waiting)."""

    kind: ClassVar[str] = "release"
    ids: list[int] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {"ids": self.ids}

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> Release:
        return cls(P.get_sids(req.get("ids"), "release ids", limits.max_list))


@dataclass
class PeerOpen(Request):
    """Open (or reuse) the two-server group `group`: this server's `role` in it, `peer`
    the other server's address, `backend` gloo or nccl (Note: [Server-to-server moves])."""

    kind: ClassVar[str] = "peer_open"
    group: str = ""
    role: Any = None
    peer: str | None = None
    backend: Any = None

    def fields(self) -> dict[str, Any]:
        return {"group": self.group, "role": self.role, "peer": self.peer, "backend": self.backend}

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> PeerOpen:
        peer = req.get("peer")
        P.need(peer is None or (type(peer) is str and len(peer) <= 256), "peer must be host:port")
        return cls(_group(req.get("group")), req.get("role"), peer, req.get("backend"))


@dataclass
class PeerSend(Request):
    kind: ClassVar[str] = "peer_send"
    group: str = ""
    id: int = 0
    tag: int = 0

    def fields(self) -> dict[str, Any]:
        return {"group": self.group, "id": self.id, "tag": self.tag}

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> PeerSend:
        return cls(
            _group(req.get("group")),
            P.get_sid(req.get("id")),
            P.get_int(req.get("tag"), 0, _MAX_TAG, "tag"),
        )


@dataclass
class PeerRecv(Request):
    kind: ClassVar[str] = "peer_recv"
    group: str = ""
    id: int = 0
    nbytes: int = 0
    tag: int = 0

    def fields(self) -> dict[str, Any]:
        return {"group": self.group, "id": self.id, "nbytes": self.nbytes, "tag": self.tag}

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> PeerRecv:
        return cls(
            _group(req.get("group")),
            P.get_sid(req.get("id")),
            P.get_int(req.get("nbytes"), 0, limits.max_storage, "nbytes"),
            P.get_int(req.get("tag"), 0, _MAX_TAG, "tag"),
        )


@dataclass
class PeerClose(Request):
    kind: ClassVar[str] = "peer_close"
    group: str = ""

    def fields(self) -> dict[str, Any]:
        return {"group": self.group}

    @classmethod
    def parse(cls, req: dict, limits: P.Limits) -> PeerClose:
        return cls(_group(req.get("group")))


_TYPES: dict[str, type[Request]] = {
    c.kind: c
    for c in (
        Hello, Stats, Bye, Upload, Run, Eager, Spec, Fetch, Release,
        PeerOpen, PeerSend, PeerRecv, PeerClose,
    )
}  # fmt: skip


def parse_request(req: Any, limits: P.Limits) -> Request:
    """The typed request a received map is; ProtocolError naming what is wrong otherwise."""
    req = P.get_map(req, "request")
    kind = req.get("t")
    cls = _TYPES.get(kind) if type(kind) is str else None
    P.need(cls is not None, f"unknown request type {str(kind)[:40]!r}")
    return cls.parse(req, limits)
