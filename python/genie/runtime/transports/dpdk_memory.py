"""Payload memory of a DPDK transport: the arena heap handed out as torch storages, so that
payloads travel without a copy (Note: [Zero copy through the arena]), and the counters that say
what was copied. A mixin of ``DpdkTransport`` (dpdk.py): it reads the transport's ``_plane``,
``_agent``, ``_config``, ``_copied_base`` and ``_agent_registrations`` and keeps
``_cuda_cache`` / ``_heap_registration_error``."""

from __future__ import annotations

import logging

from genie import _C
from genie.errors import GenieError
from genie.runtime.transports.base import TransportStats

logger = logging.getLogger(__name__)

__all__ = ["ArenaPayloads"]

# Note: [Zero copy through the arena]
# The agent can only touch memory it maps: the arena, a memfd both processes map (Note: [Arena
# heap] in csrc/dataplane/arena.h). Its heap is handed out as torch storages: ``host_buffer``
# (fetched results on the client, ``pin_memory()``-style buffers) and ``payload_storage`` (uploads
# on a CPU server) give arena memory for payloads of at least ``min_payload`` bytes, so a payload
# received into them is written there by the agent and stays there as the tensor's storage, and
# one sent from them is read by the agent in place. Any other memory takes one pipelined copy
# through the arena's slots, and ``stats.bytes_copied_sending`` / ``bytes_copied_receiving`` say
# how many bytes did. A storage keeps its block (and the mapping) alive after the connection
# closes; when the heap is full, memory comes from torch and is copied. On a CUDA server an upload
# lands in the heap and goes to the GPU from there, the heap registered with CUDA once through
# the registration cache (``registrations_hit`` / ``registrations_missed``).


class ArenaPayloads:
    """Where a DPDK transport's payloads live (Note: [Payload memory] in base.py)."""

    @property
    def zero_copy(self) -> bool:
        # Buffers from host_buffer / payload_storage travel in place; other memory takes one
        # pipelined copy per side (Note: [Zero copy through the arena]).
        return self._plane == "up" and self._heap_room() > 0

    @property
    def stats(self) -> TransportStats:
        st = self._stats
        out, into = self._copied_base
        if self._agent is not None:
            c = self._agent.client.counters()
            out += int(c["copied_out"])
            into += int(c["copied_in"])
        st.bytes_copied_sending, st.bytes_copied_receiving = out, into
        hits, misses = self._agent_registrations
        if self._cuda_cache is not None:
            cs = self._cuda_cache.stats()
            hits, misses = hits + int(cs["hits"]), misses + int(cs["misses"])
        st.registrations_hit, st.registrations_missed = hits, misses
        return st

    def arena_stats(self) -> dict[str, int]:
        """This side's arena: bytes copied and moved in place, the heap's size and use; {}
        without a data plane."""
        return dict(self._agent.client.counters()) if self._agent is not None else {}

    def _heap_room(self) -> int:
        return int(self._agent.client.heap_bytes) if self._agent is not None else 0

    def _arena_tensor(self, nbytes: int):
        """A heap block of `nbytes` as a uint8 tensor, or None where the data plane would not
        carry it or the heap has no room."""
        if (
            self._plane not in ("up", "pending")
            or self._agent is None
            or nbytes < max(1, self._config.min_payload)
        ):
            return None
        return self._agent.client.alloc(nbytes)

    def host_buffer(self, nbytes: int):
        t = self._arena_tensor(nbytes)
        return t if t is not None else super().host_buffer(nbytes)

    def host_tensor(self, shape, dtype):
        """``torch.empty(shape, dtype=dtype)`` in this connection's arena where it fits: the
        ``pin_memory()`` of the DPDK path, a tensor that is uploaded without a copy."""
        import torch

        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return self.host_buffer(nbytes).view(dtype).reshape(tuple(shape))

    def payload_storage(self, nbytes: int, device, *, zeroed: bool = False):
        import torch

        if torch.device(device).type == "cpu":
            t = self._arena_tensor(nbytes)
            if t is not None:
                if zeroed:
                    t.zero_()
                return t.untyped_storage()
        return super().payload_storage(nbytes, device, zeroed=zeroed)

    def recv_payload_into(self, dst) -> None:
        if dst.device.type == "cpu":
            self.recv_payload([memoryview(dst.numpy())])
            return
        staging = self._arena_tensor(dst.numel())
        if staging is None:
            super().recv_payload_into(dst)
            return
        self.recv_payload([memoryview(staging.numpy())])  # in place, into the heap
        self._register_heap_for_devices()
        # Synchronous: the block goes back to the heap when `staging` dies, right after.
        dst.copy_(staging)

    #: the registration cache backend that pins the heap for copies to a device
    heap_registration_backend = "cuda-host"

    def _register_heap_for_devices(self) -> None:
        """The heap is registered with CUDA (pinned, so a copy to the GPU is one DMA from the
        pages the agent wrote) through a registration cache: the first upload misses and pays
        cudaHostRegister for the whole heap, later ones hit; the registration ends before the
        arena is unmapped. Where it cannot be registered the copy still works, from pageable
        memory (slower), and a warning says why once."""
        client = self._agent.client
        if self._cuda_cache is None:
            if self._heap_registration_error is not None:
                return
            try:
                self._cuda_cache = _C.RegistrationCache(
                    self.heap_registration_backend, capacity=4, max_age=1e9
                )
            except GenieError as e:
                self._heap_registration_error = str(e)
                logger.warning("genie: uploads to the device go from unregistered memory: %s", e)
                return
            client.invalidate_on_unmap(self._cuda_cache)
        try:
            self._cuda_cache.acquire(client.heap_address, client.heap_bytes)
        except GenieError as e:
            if self._heap_registration_error is None:
                logger.warning("genie: registering the data-plane heap failed: %s", e)
            self._heap_registration_error = str(e)
