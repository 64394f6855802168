"""The client's side of Note: [Server-to-server moves] (runtime/server/peers.py): which pairs
of servers share a group, and one move between two servers, asked of both at once."""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

from genie.errors import TransportError
from genie.runtime import requests as R

logger = logging.getLogger(__name__)

__all__ = ["PeerLinks"]


class PeerLinks:
    """Groups between the servers of one multi-device plan, made on demand and cached per
    pair; closed with close()."""

    def __init__(self) -> None:
        self._groups: dict[frozenset, str | None] = {}
        self._pair_locks: dict[frozenset, threading.Lock] = {}
        self._tags = itertools.count(1)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="genie-peer")
        self.moves = 0
        self.bytes = 0

    @staticmethod
    def supported(executor) -> bool:
        return hasattr(executor, "peer_request")

    def _group(self, src, dst) -> str | None:
        """The pair's group, formed now if it has none; None when the two cannot form one
        (they do not share a token, one cannot reach the other): then moves between them go
        through this process, as before, and a warning says why once."""
        key = frozenset((id(src), id(dst)))
        with self._lock:
            if key in self._groups:
                return self._groups[key]
            try:
                name = self._form(src, dst)
            except TransportError as e:
                logger.warning(
                    "genie: %s and %s move tensors through this process: %s",
                    src.address,
                    dst.address,
                    e,
                )
                name = None
            self._groups[key] = name
            return name

    def _form(self, src, dst) -> str:
        name = "g" + secrets.token_hex(8)
        both_cuda = src.device_type == "cuda" and dst.device_type == "cuda"
        backend = "nccl" if both_cuda else "gloo"
        port = src.peer_request(R.PeerOpen(name, "listen", dst.address, backend))["port"]
        host = src.address.rpartition(":")[0]
        dst.peer_request(R.PeerOpen(name, "join", f"{host}:{port}", backend))
        return name

    def move(self, src, dst, storage: int, nbytes: int) -> bool:
        """Storage `storage` (`nbytes`) of server `src` to server `dst`, directly; False
        when the two have no group (the caller relays it)."""
        name = self._group(src, dst)
        if name is None:
            return False
        # One move at a time per pair, its send on a helper thread and its receive on this
        # one: two moves of a pair in flight could have each server wait on the other's
        # other move, and sends queued behind sends in a shared pool could wait on
        # receives that never start.
        key = frozenset((id(src), id(dst)))
        with self._lock:
            pair = self._pair_locks.setdefault(key, threading.Lock())
        with pair:
            tag = next(self._tags) % (1 << 31)
            sent = self._pool.submit(src.peer_request, R.PeerSend(name, storage, tag))
            try:
                dst.peer_request(R.PeerRecv(name, storage, nbytes, tag))
            finally:
                sent.result()
        self.moves += 1
        self.bytes += nbytes
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False)
