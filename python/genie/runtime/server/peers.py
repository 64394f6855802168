"""Server-to-server tensor moves on torch.distributed (Note: [Server-to-server moves]).

A plan over several servers has to move a storage from the server that made it to the server
that reads it. Through the client, that is two network hops and the client's memory for
every activation. Here the two servers exchange it directly over a two-rank process group of
their own: gloo between CPU servers, NCCL when both ends run on CUDA devices.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from genie.errors import GenieError, ProtocolError

logger = logging.getLogger(__name__)

__all__ = ["PeerError", "PeerGroups"]


class PeerError(GenieError):
    """A peer server could not be reached, did not prove the token, or died mid-move; the
    session that asked goes on (its reply's kind is "peer", a PeerError on the client)."""


_CONTEXT = b"genie-peer-1"
_MAX_GROUPS = 16  # per session: each is a store, a socket and a thread


# Note: [Server-to-server moves]
# The client tells each server of a pair what to do in the requests it already sends
# ("peer_open", "peer_send", "peer_recv"); no tensor byte goes through it.
# - Groups form on demand, without a global world: the first server of a pair ("listen")
#   starts a TCPStore on the address `genie serve` listens on (an ephemeral port) and answers
#   with the port at once; the second ("join") connects to it. torch.distributed.new_group
#   would need every process of a world, which servers that come and go do not have.
# - Rendezvous is authenticated before a group forms: each side writes a fresh nonce into
#   the store, and each proves the shared token with an HMAC over the group's name and the
#   other side's nonce. A side that cannot prove it never gets a group: the other side does
#   not create its half, and the impostor's attempt times out.
# - Timeouts are short (genie serve --peer-timeout, default 30 s), so a dead peer is a
#   PeerError naming it, never NCCL's or gloo's default of many minutes.
# - A group belongs to the session that opened it and is torn down with it.
@dataclass
class _Group:
    name: str
    peer: str
    rank: int
    backend: str  # "nccl" (both ends CUDA) or "gloo"
    store: object = None
    pg: object = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class PeerGroups:
    """One session's two-rank groups with other servers."""

    def __init__(self, host: str, token: bytes, device: torch.device, timeout: float):
        self._host = host
        self._token = token
        self._device = device
        self._timeout = datetime.timedelta(seconds=timeout)
        self._groups: dict[str, _Group] = {}

    def open(self, name: str, role: str, peer: str | None, backend: str) -> dict:
        """Start ("listen") or join ("join", `peer` = "host:port" of the listener) group
        `name` on `backend` (the client picks it from both ends' devices: "nccl" when both
        run on CUDA, else "gloo"). A listener answers at once with its store's port; its half
        of the group forms on a helper thread when the joiner comes. A joiner returns once the
        group formed."""
        import torch.distributed as dist

        if backend not in ("gloo", "nccl") or (
            backend == "nccl" and (self._device.type != "cuda" or not dist.is_nccl_available())
        ):
            raise ProtocolError(f"genie: invalid request: peer backend {backend!r} is not here")
        if name in self._groups:
            raise ProtocolError(f"genie: invalid request: peer group {name!r} is already open")
        if len(self._groups) >= _MAX_GROUPS:
            raise ProtocolError(
                f"genie: invalid request: a session may hold {_MAX_GROUPS} peer groups at once"
            )
        if role == "listen":
            host = "0.0.0.0" if self._host in ("", "0.0.0.0") else self._host
            store = dist.TCPStore(
                host, 0, 2, True, self._timeout, wait_for_workers=False, use_libuv=True
            )
            group = self._groups[name] = _Group(name, peer or "?", 0, backend, store)
            threading.Thread(
                target=self._form, args=(group,), name=f"genie-peer-{name[:16]}", daemon=True
            ).start()
            return {"port": store.port}
        if role != "join" or not peer:
            raise ProtocolError("genie: invalid request: peer_open needs role listen or join+peer")
        host, _, port = peer.rpartition(":")
        try:
            store = dist.TCPStore(host, int(port), 2, False, self._timeout, use_libuv=True)
        except (RuntimeError, ValueError) as e:
            raise PeerError(f"genie: cannot reach the peer server at {peer}: {e}") from None
        group = self._groups[name] = _Group(name, peer, 1, backend, store)
        self._form(group)
        if group.error:
            self._groups.pop(name, None)
            raise PeerError(group.error)
        return {}

    def _form(self, group: _Group) -> None:
        import torch.distributed as dist

        store, me, other = group.store, f"r{group.rank}", f"r{1 - group.rank}"
        try:
            nonce = os.urandom(32)
            store.set(f"{group.name}/nonce/{me}", nonce)
            theirs = store.get(f"{group.name}/nonce/{other}")
            store.set(f"{group.name}/proof/{me}", self._mac(group.name, me, theirs))
            proof = store.get(f"{group.name}/proof/{other}")
            if not hmac.compare_digest(proof, self._mac(group.name, other, nonce)):
                raise PeerError(
                    f"genie: the peer at {group.peer} did not prove the server's token; no group"
                )
            prefix = dist.PrefixStore(f"{group.name}/pg/", store)
            if group.backend == "nccl":
                group.pg = dist.ProcessGroupNCCL(prefix, group.rank, 2)
            else:
                group.pg = dist.ProcessGroupGloo(prefix, group.rank, 2, self._timeout)
        except PeerError as e:
            group.error = str(e)
        except Exception as e:  # noqa: BLE001 - a rendezvous that times out or breaks
            group.error = f"genie: forming a group with the peer server at {group.peer}: {e}"
        finally:
            if group.error:
                logger.warning("%s", group.error)
            group.ready.set()

    def _mac(self, name: str, rank: str, nonce: bytes) -> bytes:
        msg = _CONTEXT + name.encode() + rank.encode() + bytes(nonce)
        return hmac.new(self._token, msg, hashlib.sha256).digest()

    def _group(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            raise ProtocolError(f"genie: invalid request: no peer group {name!r} in this session")
        if not group.ready.wait(self._timeout.total_seconds()):
            raise PeerError(f"genie: the peer server at {group.peer} never joined")
        if group.error:
            raise PeerError(group.error)
        return group

    def send(self, name: str, data: torch.Tensor, tag: int) -> None:
        group = self._group(name)
        wire = data if group.backend == "nccl" else data.cpu()  # gloo moves host memory
        try:
            group.pg.send([wire], 1 - group.rank, tag).wait()
        except RuntimeError as e:
            raise PeerError(f"genie: sending to the peer server at {group.peer}: {e}") from None

    def recv(self, name: str, nbytes: int, tag: int) -> torch.Tensor:
        group = self._group(name)
        wire = self._device if group.backend == "nccl" else torch.device("cpu")
        buf = torch.empty(nbytes, dtype=torch.uint8, device=wire)
        try:
            group.pg.recv([buf], 1 - group.rank, tag).wait()
        except RuntimeError as e:
            raise PeerError(f"genie: receiving from the peer server at {group.peer}: {e}") from None
        return buf.to(self._device)

    def close(self, name: str | None = None) -> None:
        names = list(self._groups) if name is None else [name]
        for n in names:
            group = self._groups.pop(n, None)
            if group is not None and group.pg is not None:
                try:
                    group.pg.abort() if hasattr(group.pg, "abort") else None
                except Exception:  # noqa: BLE001 - best effort at teardown
                    pass

    def __len__(self) -> int:
        return len(self._groups)
