"""One connection's requests and replies: framing, deferred operations, pipelined fetches and
unanswered speculative requests, and the one place a server's error reply becomes a genie error.

The RemoteExecutor decides what to send; the Channel only sends it and reads the answers, in
order. A transport failure here ends the session (``lost``); an error reply raises
``RequestFailed`` with the server's kind, which ``raise_error`` turns into the genie error a
user sees.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from genie.errors import ExecutionError, GenieError, ProtocolError, RemoteError, TransportError
from genie.runtime import protocol as P
from genie.runtime import requests as R
from genie.runtime.transports import Transport

logger = logging.getLogger(__name__)

__all__ = ["Channel", "FetchPlan", "RequestFailed", "raise_error"]

_REPLY_MAX_HEADER = 64 << 20


class RequestFailed(GenieError):
    """A server's error reply, with its kind; raised as the matching genie error."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


_KINDS = {"execution": ExecutionError, "protocol": ProtocolError, "peer": TransportError}


def raise_error(e: RequestFailed) -> None:
    """Raise the genie error a user sees for the server's error reply `e`."""
    cls = _KINDS.get(e.kind, RemoteError)
    raise cls(str(e)) from None


@dataclass
class FetchPlan:
    """A fetch request, where its payload goes, and how the value is made once it arrived."""

    request: R.Fetch
    receive: Callable[[dict], list[memoryview]]
    result: Callable[[], torch.Tensor]


def _outputs_of(fetches: Sequence[FetchPlan]) -> Callable[[dict], list[memoryview]]:
    """Where a run's reply that carries `fetches` puts their bytes (Note: [Outputs in the
    run's reply] in server/session.py)."""

    def receive(reply: dict) -> list[memoryview]:
        sizes = reply.get("n")
        if type(sizes) is not list or len(sizes) != len(fetches):
            raise ProtocolError(
                f"genie: the server answered sizes {sizes!r} for {len(fetches)} fetched tensors"
            )
        views: list[memoryview] = []
        for plan, n in zip(fetches, sizes, strict=True):
            if n != -1:
                views += plan.receive({"n": n})
        return views

    return receive


class Channel:
    """Requests to one server over `transport`, each answered in order."""

    def __init__(self, transport: Transport, address: str, counters: dict[str, Any]):
        self.t = transport
        self.address = address
        self.counters = counters  # shared with the executor: its stats
        self.broken: str | None = None
        # Releases and binds need no answer: they ride on the next request (its "pre")
        # instead of costing a round trip each.
        self.outbox: list[list] = []
        self.released: list[int] = []
        # Requests sent without waiting for their replies, oldest first: what to do with each
        # reply (None: a speculative run's). Their replies precede every later one.
        self._unanswered: collections.deque[Callable[[dict], None] | None] = collections.deque()
        self.specs_unread = 0  # speculative requests among them

    # -- failure --------------------------------------------------------------------------
    def lost(self, e: Exception) -> TransportError:
        """The connection failed: the session and every tensor it held are gone."""
        self.broken = (
            f"genie: lost the genie server at {self.address} ({e}). Tensors that lived there are "
            "gone. Check that it is running (start it again with `genie serve --port ...`), then "
            "rerun the program; genie.connect() opens a new session."
        )
        self.t.close()
        return TransportError(self.broken)

    def check(self) -> None:
        if self.broken is not None:
            raise TransportError(self.broken)

    # -- requests -------------------------------------------------------------------------
    def request(
        self,
        req: R.Request,
        buffers: Sequence[memoryview] = (),
        receive: Callable[[dict], list[memoryview]] | None = None,
        fetches: Sequence[FetchPlan] = (),
        then_spec: Callable[[], None] | None = None,
    ) -> tuple[dict, list[torch.Tensor | None]]:
        """Send one request and read its reply. `fetches` (a run's only) are answered with it
        (Note: [Run then fetch]): the run's reply carries their bytes (Note: [Outputs in the
        run's reply] in server/session.py); their values come back in order, None for each
        that did not arrive because the run or the fetch failed. `then_spec` sends a
        speculative request behind it, before its reply is read."""
        self.check()
        header = req.header()
        self._attach_pre(header)
        if fetches:
            if not isinstance(req, R.Run):
                raise TypeError(f"genie: only a run answers fetches, not a {req.kind!r} request")
            header["fetch"] = [plan.request.wire_ref for plan in fetches]
            receive = _outputs_of(fetches)
        try:
            self.t.send_frame(P.PROTOCOL_VERSION, P.REQUEST, P.pack(header), buffers)
            self.outbox, self.released = [], []
            self._read_unanswered()  # they precede this request's reply
            if then_spec is not None:
                then_spec()
            reply = self._read_reply(receive)
        except (TransportError, ProtocolError) as e:
            raise self.lost(e) from None
        ok = reply.get("ok") is True
        sizes = reply["n"] if ok and fetches else [-1] * len(fetches)  # checked by `receive`
        values = [p.result() if n != -1 else None for p, n in zip(fetches, sizes, strict=True)]
        self.counters["requests"] += 1
        if reply.get("spec") == "hit":
            self.counters["spec_hits"] += 1
        if not ok:
            kind = str(reply.get("kind", "remote"))
            msg = str(reply.get("msg", "the server answered with an error"))
            if reply.get("fatal"):
                self.broken = msg
                self.t.close()
            raise RequestFailed(kind, msg)
        return reply, values

    @property
    def unread(self) -> int:
        """Replies to requests sent without waiting, not read yet."""
        return len(self._unanswered)

    def send_unanswered(
        self,
        req: R.Request,
        buffers: Sequence[memoryview] = (),
        on_reply: Callable[[dict], None] | None = None,
        background: bool = False,
    ) -> None:
        """Send a request whose reply is read before the next request's: a speculative run
        (it carries the deferred operations), or, with `on_reply`, an early upload that does
        not (Note: [Early uploads] in early.py); `on_reply` gets its reply. With `background`
        (a transport with ``background_sends``) the call returns before `buffers` are sent,
        and they must not change until they are."""
        self.check()
        header = req.header()
        if on_reply is None:
            self._attach_pre(header)
        kw = {"background": True} if background else {}
        try:
            self.t.send_frame(P.PROTOCOL_VERSION, P.REQUEST, P.pack(header), buffers, **kw)
        except (TransportError, ProtocolError) as e:
            raise self.lost(e) from None
        self._unanswered.append(on_reply)
        if on_reply is None:
            self.outbox, self.released = [], []
            self.specs_unread += 1

    def read_unanswered(self) -> None:
        """Read the replies to requests sent without waiting (the connection is lost on a
        transport failure)."""
        try:
            self._read_unanswered()
        except (TransportError, ProtocolError) as e:
            raise self.lost(e) from None

    def fetch_plan(self, ref: dict) -> FetchPlan:
        """The fetch of the tensor `ref` (a core ref dict) into a buffer of the transport's."""
        shape = tuple(ref["shape"])
        dtype = ref["dtype"]
        numel = 1
        for s in shape:
            numel *= s
        expected = numel * P.itemsize(dtype)
        out = self.t.host_buffer(expected)  # Note: [Payload memory] (transports/base.py)

        def receive(reply: dict) -> list[memoryview]:
            if reply.get("n") != expected:
                raise ProtocolError(
                    f"genie: the server sent {reply.get('n')} bytes for a {expected}-byte tensor"
                )
            return [memoryview(out.numpy())]

        def result() -> torch.Tensor:
            self.counters["fetches"] += 1
            self.counters["fetch_bytes"] += expected
            if numel == 0:
                return torch.empty(shape, dtype=dtype)
            return out.view(dtype).reshape(shape)

        return FetchPlan(R.Fetch(wire_ref=P.encode_ref(ref)), receive, result)

    # -- replies --------------------------------------------------------------------------
    def _read_reply(self, receive: Callable[[dict], list[memoryview]] | None) -> dict:
        frame = self.t.recv_frame(_REPLY_MAX_HEADER)
        if frame.kind != P.REPLY:
            raise ProtocolError(f"genie: unexpected frame kind {frame.kind} from the server")
        reply = P.get_map(P.unpack(frame.header), "reply")
        if reply.get("ok") is True and receive is not None:
            self.t.recv_payload(receive(reply))
        elif frame.payload_len:
            self.t.skip_payload(frame.payload_len)
        return reply

    def _attach_pre(self, header: dict) -> None:
        """Deferred releases and binds ride on `header`; the caller empties the outbox once
        the request is sent."""
        pre = self.outbox
        if self.released:
            pre = [["release", self.released], *pre]
        if pre:
            header["pre"] = pre

    def _read_unanswered(self) -> None:
        """Read the answers to requests sent without waiting (they precede every other
        reply)."""
        while self._unanswered:
            reply = self._read_reply(None)
            on_reply = self._unanswered.popleft()
            if on_reply is not None:
                if reply.get("fatal"):
                    raise ProtocolError(str(reply.get("msg", "the server closed the connection")))
                on_reply(reply)
                continue
            self.specs_unread -= 1
            if reply.get("ok") is not True:
                msg = str(reply.get("msg", "the server refused a speculative run"))
                if reply.get("fatal"):
                    raise ProtocolError(msg)
                logger.warning("genie: a speculative run request failed: %s", msg)
            elif reply.get("spec") is True:
                self.counters["spec_started"] += 1
            else:
                logger.debug("genie: speculative run declined: %s", reply.get("why"))
