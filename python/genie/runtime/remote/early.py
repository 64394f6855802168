"""Uploads begun when a value is known (``x.to(device)``), not at the flush that needs it
(Note: [Early uploads])."""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from genie.runtime import requests as R
from genie.runtime.remote.channel import Channel, RequestFailed, raise_error
from genie.runtime.remote.uploads import Progress, frames_of, interrupt_deferred, upload_parts

logger = logging.getLogger(__name__)

__all__ = ["EarlyUploads"]

_INLINE = 256 << 10  # sent by the recording thread itself up to this size (GENIE_EARLY_INLINE)
_MAX = 64 << 20  # larger values wait for the flush (GENIE_EARLY_MAX)
_UNREAD = 256  # replies left unread before the sender reads them


def _env_bytes(name: str, default: int) -> int:
    try:
        return max(int(os.environ.get(name, default)), 0)
    except ValueError:
        return default


# Note: [Early uploads]
# Why: a serving loop records `x.to(dev)` and then the forward. If x's bytes crossed the wire
# only at the flush, the server would idle while the client records, and nothing could start
# early: a fresh upload cannot be guessed. So the copy kernel hands the executor each value it
# records for upload (Executor::upload_early in csrc/capture/executor.h), and the client sends
# it at once as an "upload" request of its own, without waiting for the reply; the flush then
# names the storage like any resident one.
#
# One connection carries the requests, answered in order, so "in the background" means ahead
# of the flush on that connection, never on a second one. Over TCP the recording thread hands
# every such upload to the transport's native writer inside .to() and goes on at once (Note:
# [Background sends] in csrc/bindings/socket_writer.cpp); a Python sender thread would need the
# GIL, which the recording thread gives up only every 5 ms, and measured on a GPU host a 4.8 MB
# input then reached the server after the recording had ended. Over a transport without one, a
# value of up to GENIE_EARLY_INLINE bytes (256 KiB) is sent by the recording thread itself (a
# send into the socket buffer), and a larger one is queued for a sender thread. Any other
# request first sends what is still queued, in its own thread and in queue order, with the
# progress and Ctrl-C handling of Note: [Large uploads]: the server sees the requests in the
# order the program made them. Values over GENIE_EARLY_MAX bytes (64 MiB, a large weight)
# and empty ones (Note: [Speculative runs] foresees those) stay with the flush.
#
# What a user sees stays what the flush-time upload gave:
# - Value: the copy kernel records a private snapshot of the source taken at .to() (eager .to()
#   copies too), and that snapshot is what goes, so writing the CPU tensor in place after .to()
#   changes nothing remote. A snapshot rather than copy-on-write: an in-place CPU op has no
#   hook that could copy before it writes (the version counter only tells afterwards), and by
#   then the bytes may be on the wire. A CPU operand of a remote op (the logical-device rule)
#   also starts uploading when its op is recorded, from its own memory: the flush refuses such
#   an operand written in place since, as it always did, so the bytes that went are the bytes
#   it reads.
# - Failure: the reply is read behind a later request. A failed upload (over the session's
#   memory limit, say) is remembered by storage id and the flush that needs that storage raises
#   the upload's error: before sending anything when the reply is already read, else in place
#   of the error the missing input caused. The session goes on; that storage never became
#   resident, and every later flush that reads it raises the same error.
# - Lifetime: a storage dropped while its upload is still queued is taken off the queue and
#   never sent; one dropped later is released like any other, behind its upload.
# - Uploads carry no deferred releases ("pre"), so one that arrives while the server holds a
#   speculative run leaves that run pending (Note: [Speculative runs]).
# Uploads begun since the last flush, in order, are what a guess of "the same program with a
# new input" binds (Note: [Client speculation]).
@dataclass
class _Upload:
    sid: int
    shape: tuple[int, ...]
    nbytes: int
    frames: list[list[tuple[list, memoryview]]]
    queued: bool = True
    error: tuple[str, str] | None = None  # (kind, message) of a failed upload


@dataclass
class _Later:
    """Something sent behind the uploads queued before it (a speculative run's guess)."""

    send: Callable[[], None]
    queued: bool = True
    nbytes: int = 0


class EarlyUploads:
    """A client's uploads begun at .to(). `lock` is the client's (held around every send on
    `channel`); `on_resident(sid, nbytes)` hears of each one the server confirmed."""

    def __init__(
        self,
        channel: Channel,
        lock: threading.RLock,
        max_message: int,
        counters: dict[str, Any],
        on_resident: Callable[[int, int], None],
        enabled: bool,
    ):
        self.enabled = enabled
        self._channel = channel
        self._lock = lock
        self.max_message = max_message
        self._counters = counters
        self._on_resident = on_resident
        self._inline = _env_bytes("GENIE_EARLY_INLINE", _INLINE)
        # A transport that writes frames from a native thread takes every early upload from
        # the recording thread itself, which then goes on at once (Note: [Background sends]).
        self._background = channel.t.background_sends
        self._max = _env_bytes("GENIE_EARLY_MAX", _MAX)
        self._qlock = threading.Lock()  # the queue and the maps below; never held while sending
        self._queue: collections.deque[_Upload | _Later] = collections.deque()
        self._uploads: dict[int, _Upload] = {}  # sid -> begun, until the storage is released
        # The uploads of one request being recorded, in the order their .to() ran: those begun
        # since the first flush that followed an upload. A position in it is what a guess
        # binds (Note: [Client speculation]); entries stay in place once used or failed, so
        # that positions do not move.
        self.arrivals: list[int] = []
        self._flushed = True  # a flush ran since the last upload began: the next starts anew
        self._failed = 0  # how many of _uploads failed
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- the recording thread -------------------------------------------------------------
    def begin(self, sid: int, value: torch.Tensor) -> bool:
        """Start uploading `value` (a CPU tensor nobody writes before its flush) as storage
        `sid`; False when it stays with the flush."""
        if not self.enabled or self._closed or self._channel.broken is not None:
            return False
        nbytes = value.numel() * value.element_size()
        if nbytes == 0 or nbytes > self._max or value.device.type != "cpu":
            return False
        frames = frames_of(upload_parts({sid: value}, self.max_message), self.max_message)
        up = _Upload(int(sid), tuple(value.shape), nbytes, frames)
        with self._qlock:
            alone = not self._queue  # inline only when nothing larger waits ahead of it
            self._queue.append(up)
            self._uploads[up.sid] = up
            if self._flushed:
                self.arrivals, self._flushed = [], False
            self.arrivals.append(up.sid)
        self._kick(alone and (nbytes <= self._inline or self._background))
        return True

    @property
    def flushed(self) -> bool:
        """Whether a flush ran since the last upload began (``arrivals`` is last request's)."""
        return self._flushed

    def later(self, send: Callable[[], None]) -> None:
        """Call `send` (with the client's lock) once the uploads queued now are sent."""
        with self._qlock:
            alone = not self._queue
            self._queue.append(_Later(send))
        self._kick(alone)

    def _kick(self, inline: bool) -> None:
        if inline and self._lock.acquire(blocking=False):
            try:
                self.send_queued(progress=False)
            finally:
                self._lock.release()
            return
        with self._qlock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="genie-early-uploads", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            with self._lock:
                if self._closed:
                    return
                try:
                    self.send_queued(progress=False)
                except Exception as e:  # noqa: BLE001 - the next request reports a lost channel
                    logger.debug("genie: early upload sender stopped: %s", e)

    # -- sending (the caller holds the client's lock) -------------------------------------
    def send_queued(self, progress: bool = True) -> None:
        """Send what is queued, in this thread and in order. With `progress` (a request is
        about to go): progress and Ctrl-C as Note: [Large uploads]; after Ctrl-C the uploads
        not sent are failed and KeyboardInterrupt is raised."""
        if not self._queue:
            return
        if not progress:  # the sender thread, or a send behind nothing large (.to() itself)
            while (item := self._pop()) is not None:
                item.send() if isinstance(item, _Later) else self._send(item)
            return
        bar = Progress(sum(x.nbytes for x in list(self._queue)))
        try:
            with interrupt_deferred() as interrupted:
                while (item := self._pop()) is not None:
                    if isinstance(item, _Later):
                        item.send()
                        continue
                    self._send(item)
                    bar.advance(item.nbytes)
                    if interrupted():
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            bar.close()

    def _pop(self) -> _Upload | _Later | None:
        with self._qlock:
            if not self._queue:
                return None
            item = self._queue.popleft()
            item.queued = False
            return item

    def _send(self, up: _Upload) -> None:
        for i, frame in enumerate(up.frames):
            last = i == len(up.frames) - 1
            self._channel.send_unanswered(
                R.Upload(R.pieces_of(frame)),
                [v for _, v in frame],
                on_reply=lambda reply, last=last: self._answered(up, reply, last),
                # Nobody writes it before its flush (a private snapshot, or an operand the
                # flush refuses once written): it may go after this call returns.
                background=self._background,
            )
            self._counters["uploads"] += len(frame)
            self._counters["upload_bytes"] += sum(e[3] for e, _ in frame)
        up.frames = []  # the views keep the snapshot alive; the recorder holds it until its flush
        self._counters["uploads_early"] += 1
        if self._channel.unread > _UNREAD:
            self._channel.read_unanswered()

    def _answered(self, up: _Upload, reply: dict, last: bool) -> None:
        with self._qlock:
            if self._uploads.get(up.sid) is not up or up.error is not None:
                return  # released meanwhile, or an earlier piece failed
            if reply.get("ok") is not True:
                self._fail(up, str(reply.get("kind", "remote")), str(reply.get("msg", "")))
                return
        if last:
            self._on_resident(up.sid, up.nbytes)

    def _fail(self, up: _Upload, kind: str, msg: str) -> None:
        up.error = (kind, msg)
        self._failed += 1

    def _interrupted(self) -> None:
        with self._qlock:
            for item in list(self._queue):
                if isinstance(item, _Upload):
                    self._fail(item, "interrupted", "genie: the upload was interrupted (Ctrl-C)")
            self._queue.clear()
        logger.warning("genie: uploads interrupted; the session goes on")

    # -- the flush ------------------------------------------------------------------------
    def take(self, constants: dict[int, torch.Tensor]) -> tuple[dict, list[int]]:
        """Split a flush's uploads into those still to send and those begun early; raises
        the upload's error if one of them failed."""
        self._flushed = True
        if not self._uploads:
            return constants, []
        rest: dict[int, torch.Tensor] = {}
        early: list[int] = []
        with self._qlock:
            for sid, value in constants.items():
                if sid in self._uploads:
                    early.append(sid)
                else:
                    rest[sid] = value
        if self._failed:
            self.raise_failed(early)
        return rest, early

    def raise_failed(self, sids) -> None:
        """Raise the error of the first failed upload among `sids`."""
        if not self._failed:
            return
        for sid in sids:
            up = self._uploads.get(sid)
            if up is not None and up.error is not None:
                kind, msg = up.error
                raise_error(
                    RequestFailed(
                        kind,
                        f"genie: the upload of a tensor of shape {list(up.shape)} begun at "
                        f".to() failed: {msg.removeprefix('genie: ')}",
                    )
                )

    def check(self, binding: list[int]) -> None:
        """Raise a failed upload's error if a flush bound to `binding` reads its storage."""
        if self._failed:
            self.raise_failed(binding)

    # -- lifetime ---------------------------------------------------------------------------
    def release(self, ids: list[int]) -> None:
        """Storages nobody can reach: a queued upload of one is never sent."""
        if not self._uploads:
            return
        ids = set(ids)
        with self._qlock:
            dropped = False
            for sid in ids:
                up = self._uploads.pop(sid, None)
                if up is None:
                    continue
                if up.error is not None:
                    self._failed -= 1
                dropped = dropped or up.queued
                up.queued = False
            if dropped:
                self._queue = collections.deque(
                    x for x in self._queue if not (isinstance(x, _Upload) and x.sid in ids)
                )

    def close(self) -> None:
        self._closed = True
        with self._qlock:
            self._queue.clear()
        self._wake.set()
