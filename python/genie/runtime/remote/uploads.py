"""How a client's uploads are cut and sent: pieces no larger than a frame may carry, progress
for large uploads, and Ctrl-C that leaves the session usable (Note: [Large uploads])."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import torch

from genie.runtime.remote.namer import storage_span

logger = logging.getLogger(__name__)

__all__ = ["Progress", "frames_of", "upload_parts", "interrupt_deferred", "send_in_frames"]

_CHUNK = 64 << 20  # bytes per piece of a large upload (GENIE_UPLOAD_CHUNK)
_PROGRESS = 256 << 20  # uploads from this size on report progress (GENIE_UPLOAD_PROGRESS)


def _env_bytes(name: str, default: int) -> int:
    try:
        return max(int(os.environ.get(name, default)), 1)
    except ValueError:
        return default


# Note: [Large uploads]
# A multi-GB set of weights goes as pieces of GENIE_UPLOAD_CHUNK bytes (64 MiB), each piece a
# view of the tensor's own storage (nothing is copied on the client), several pieces to a
# frame up to the server's max_message. From GENIE_UPLOAD_PROGRESS bytes (256 MiB) on, the
# client shows progress: a tqdm bar when stderr is a terminal and tqdm is installed (HF
# brings it), else a log line at INFO every tenth. Ctrl-C during an upload must not leave the
# connection in the middle of a frame (the stream would be out of step): the interrupt is
# held until the frame in flight is sent and answered, then the storages whose pieces did not
# all arrive are released on the server and KeyboardInterrupt is raised. The session goes
# on; what did arrive whole stays resident.
def upload_parts(
    constants: dict[int, torch.Tensor], max_message: int
) -> list[tuple[list, memoryview]]:
    """[([id, nbytes, at, n, first], view)] covering every constant in pieces."""
    step = max(min(max_message, _env_bytes("GENIE_UPLOAD_CHUNK", _CHUNK)), 1)
    parts = []
    for sid, t in constants.items():
        if t.device.type != "cpu":
            t = t.cpu()
        lo, hi = storage_span(t)
        st = t.untyped_storage()
        at = lo
        first = True
        while first or at < hi:
            n = min(step, hi - at)
            view = _bytes_of(st, at, at + n) if n else memoryview(b"")
            parts.append(([int(sid), hi, at, n, first], view))
            at += n
            first = False
    return parts


def frames_of(
    parts: list[tuple[list, memoryview]], max_message: int
) -> list[list[tuple[list, memoryview]]]:
    """`parts` (from ``upload_parts``) grouped into frames of at most `max_message` bytes."""
    frames: list[list[tuple[list, memoryview]]] = []
    batch: list[tuple[list, memoryview]] = []
    size = 0
    for entry, view in parts:
        if batch and size + entry[3] > max_message:
            frames.append(batch)
            batch, size = [], 0
        batch.append((entry, view))
        size += entry[3]
    if batch:
        frames.append(batch)
    return frames


def send_in_frames(
    parts: list[tuple[list, memoryview]],
    max_message: int,
    send_batch: Callable[[list[tuple[list, memoryview]]], None],
    resident: Callable[[int], bool],
    release: Callable[[list[int]], None],
) -> None:
    """Send `parts` (from ``upload_parts``) as upload requests of at most `max_message` bytes
    each, through `send_batch`; with progress, and Ctrl-C held between frames. After an
    interrupt, the storages that are not `resident` (their last piece did not arrive) are
    `release`d and KeyboardInterrupt is raised (Note: [Large uploads])."""
    progress = Progress(sum(e[3] for e, _ in parts))
    started = {e[0] for e, _ in parts}
    try:
        with interrupt_deferred() as interrupted:
            for batch in frames_of(parts, max_message):
                send_batch(batch)
                progress.advance(sum(e[3] for e, _ in batch))
                if interrupted():
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        # Storages whose last piece did not arrive hold zeros where it would have gone.
        partial = [sid for sid in started if not resident(sid)]
        release(partial)
        logger.warning(
            "genie: upload interrupted after %.1f of %.1f MiB; %d partly sent tensor(s) "
            "released, the session goes on",
            progress.done / 2**20,
            progress.total / 2**20,
            len(partial),
        )
        raise
    finally:
        progress.close()


def _bytes_of(st: torch.UntypedStorage, lo: int, hi: int) -> memoryview:
    return memoryview(torch.empty(0, dtype=torch.uint8).set_(st, lo, (hi - lo,), (1,)).numpy())


class Progress:
    """Progress of one upload of `total` bytes (Note: [Large uploads]); silent below the
    threshold."""

    def __init__(self, total: int, what: str = "uploading"):
        self.total = total
        self.done = 0
        self._bar = None
        self._next_log = 0.1
        self.active = total >= _env_bytes("GENIE_UPLOAD_PROGRESS", _PROGRESS)
        if self.active and sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"genie {what}")
        if self.active and self._bar is None:
            logger.info("genie: %s %.1f MiB", what, total / 2**20)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.active:
            return
        if self._bar is not None:
            self._bar.update(nbytes)
            return
        fraction = self.done / max(self.total, 1)
        if fraction >= self._next_log or self.done >= self.total:
            logger.info("genie: uploaded %d%% (%.1f MiB)", int(fraction * 100), self.done / 2**20)
            while self._next_log <= fraction:
                self._next_log += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def interrupt_deferred() -> Iterator[Callable[[], bool]]:
    """Hold SIGINT while the block sends frames; yields a function that says whether one
    arrived. Outside the main thread (where Python delivers signals) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hit = []

    def hold(signum, frame):
        hit.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)
