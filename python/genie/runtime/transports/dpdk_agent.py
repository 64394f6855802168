"""The DPDK data plane's side of a transport: whether DPDK can be used here, its
configuration (DpdkConfig), and the agent that runs the endpoint (genie-dpdk-agent, or the
in-process loop); the transport itself is dpdk.py."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field

from genie import _C
from genie.envflags import env_flag
from genie.errors import GenieError, UnsupportedOperationError

logger = logging.getLogger(__name__)

__all__ = ["DpdkConfig", "available", "unavailable_reason"]


def available() -> bool:
    """Whether this build can run the DPDK transport."""
    return bool(_C._dpdk_available())


def unavailable_reason() -> str:
    """Why the DPDK transport cannot run here ('' when it can)."""
    return str(_C._dpdk_unavailable_reason())


def _env_size(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if t[-1:] in units else t) * scale)
    except ValueError:
        raise UnsupportedOperationError(f"genie: {name}={text!r} is not a size") from None


def host_id() -> str:
    """Identifies this host (memif connects processes of one host only)."""
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path) as f:
                value = f.read().strip()
            if value:
                return f"{value}:{socket.gethostname()}"
        except OSError:
            continue
    return socket.gethostname()


@dataclass
class DpdkConfig:
    """How this side's data-plane agent is set up (defaults: memif on one host)."""

    #: "memif" (a socket chosen per connection), "memif:ARGS", "vdev:NAME,ARGS", "pci:ADDRESS";
    #: a memif client's ring is zero-copy unless ARGS say "zero-copy=no"
    port: str = "memif"
    #: shared memory between this process and its agent for copied payloads: half for
    #: sending, half for receiving, in slots
    arena_bytes: int = 64 << 20
    #: shared memory handed out as tensor storages that travel without a copy (Note: [Zero
    #: copy through the arena]); virtual until used, resident up to its high-water mark
    heap_bytes: int = 1 << 30
    #: one pipelined copy step: the agent moves one slot while the next is copied
    slot_bytes: int = 512 << 10
    #: payloads smaller than this go over TCP: below ~1 MiB the agents' round trips cost more
    #: than TCP's copy (bench/bench_dataplane.py, "py dpdk" vs "py tcp")
    min_payload: int = 1 << 20
    #: seconds without any sign of the peer's agent before a transfer fails
    peer_timeout: float = 3.0
    #: seconds to bring the data plane up before falling back to TCP
    connect_timeout: float = 20.0
    #: extra agent options, key -> value (csrc/dataplane/config.h)
    options: dict[str, str] = field(default_factory=dict)
    #: run the endpoint on a thread of this process, not in a helper process: zero copy of any
    #: memory, no crash isolation (Note: [In-process endpoint])
    in_process: bool = False
    #: a memif client's agent reserves the arena in its EAL memory, which its zero-copy ring
    #: shares, so chunks it sends are copied by nobody on its side (Note: [Arena in EAL memory]
    #: in csrc/dataplane/eal.h): 4 copies a round trip instead of 5 (staged) or 6 (copy ring).
    #: On the busy 2-core VM that is 14-35% faster at 16 MB-1 GB; on a quieter one, where the
    #: server's agent reading the client's memory is the critical path, 2-11% slower
    #: (bench/bench_dataplane_zerocopy.py). Needs the arena + 256 MB under 4 GB, else staged.
    arena_in_eal: bool = True

    @classmethod
    def from_env(cls) -> DpdkConfig:
        options = {}
        for item in os.environ.get("GENIE_DPDK_OPTIONS", "").split():
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UnsupportedOperationError(
                    f"genie: GENIE_DPDK_OPTIONS item {item!r} is not key=value"
                )
            options[key] = value
        return cls(
            port=os.environ.get("GENIE_DPDK_PORT", "memif"),
            arena_bytes=_env_size("GENIE_DPDK_ARENA", 64 << 20),
            heap_bytes=_env_size("GENIE_DPDK_HEAP", 1 << 30),
            slot_bytes=_env_size("GENIE_DPDK_SLOT", 512 << 10),
            min_payload=_env_size("GENIE_DPDK_MIN_PAYLOAD", 1 << 20),
            peer_timeout=float(os.environ.get("GENIE_DPDK_PEER_TIMEOUT", "3.0")),
            connect_timeout=float(os.environ.get("GENIE_DPDK_CONNECT_TIMEOUT", "20.0")),
            options=options,
            in_process=env_flag("GENIE_DPDK_IN_PROCESS", False),
            arena_in_eal=env_flag("GENIE_DPDK_ARENA_IN_EAL", True),
        )

    @property
    def is_memif(self) -> bool:
        return self.port == "memif" or self.port.startswith("memif:")


#: EAL memory an agent needs beside its arena (mempools of 16 KiB mbufs: ~110 MB)
_EAL_SPARE_MB = 256


class Agent:
    """One genie-dpdk-agent process and the client that drives it; with
    ``config.in_process``, the same loop on a thread of this process (Note: [In-process
    endpoint]) and no process."""

    def __init__(self, config: DpdkConfig, role: str, socket_name: str | None):
        if config.slot_bytes <= 0 or config.arena_bytes < 2 * config.slot_bytes:
            raise UnsupportedOperationError(
                "genie: GENIE_DPDK_ARENA must hold at least two GENIE_DPDK_SLOT slots"
            )
        path = _C._dataplane_agent_path()
        page = os.sysconf("SC_PAGESIZE")
        copy_bytes = -(-config.arena_bytes // page) * page
        heap_bytes = -(-max(0, config.heap_bytes) // page) * page
        total = copy_bytes + heap_bytes
        port = config.port
        options = dict(config.options)
        if port.startswith("pci:"):
            # EAL takes only the PCI devices it is told to (--no-pci otherwise).
            options.setdefault("eal_pci", port[len("pci:") :])
        eal_arena = False
        if config.is_memif:
            port = f"memif:role={role},socket={socket_name}"
            if config.port.startswith("memif:"):
                port += "," + config.port[len("memif:") :]
            if role == "client" and not config.in_process and "zero-copy=" not in port:
                # The client's ring shares its agent's memory: one copy fewer from the server
                # to the client (Note: [memif zero copy] in csrc/dataplane/port.cpp).
                port += ",zero-copy=yes"
            eal_mb = -(-total // (1 << 20)) + _EAL_SPARE_MB
            zero_copy = "zero-copy=yes" in port and role == "client" and not config.in_process
            if config.arena_in_eal and zero_copy and "eal_memory_mb" not in options:
                eal_arena = eal_mb < 4096  # ring offsets are 32 bits
                if eal_arena:
                    options["eal_memory_mb"] = str(eal_mb)
                    if "rsize=" not in port:
                        # A chunk from the arena takes two descriptors (header, payload); the
                        # ring holds no buffers, so a larger one costs no cache (2^10: 6.0 GB/s
                        # uploads at 256 MB against 4.5 with copy mode's 2^8).
                        port += ",rsize=10"
            elif config.arena_in_eal:
                logger.info(
                    "genie: the arena stays out of EAL memory (no zero-copy client "
                    "ring, eal_memory_mb given, or over 4 GB)"
                )
        arena_fd = -1 if eal_arena else os.memfd_create("genie-dpdk-arena", os.MFD_CLOEXEC)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._log = tempfile.TemporaryFile(prefix="genie-dpdk-agent-")  # noqa: SIM115
        try:
            if arena_fd >= 0:
                os.ftruncate(arena_fd, total)
            args = [
                path,
                f"--sock-fd={child.fileno()}",
                f"--arena-fd={arena_fd if arena_fd >= 0 else 'eal'}",
                f"--arena-bytes={total}",
                f"port={port}",
                f"peer_timeout_ms={int(config.peer_timeout * 1000)}",
                f"connect_timeout_ms={int(config.connect_timeout * 1000)}",
                *(f"{k}={v}" for k, v in options.items()),
            ]
            self.in_process = config.in_process
            if self.in_process:
                self.proc = None
                # The thread owns its end of the socket pair and its own arena descriptor.
                _C._dataplane_start_in_process(child.detach(), os.dup(arena_fd), total, args[4:])
            else:
                # A session of its own: a terminal's Ctrl-C is for the user's process, which
                # then closes the socket; the agent exits on that EOF.
                self.proc = subprocess.Popen(
                    args,
                    pass_fds=(child.fileno(), arena_fd) if arena_fd >= 0 else (child.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=self._log,
                    start_new_session=True,
                )
                child.close()
            self.client = _C._DataplaneAgentClient(
                parent.detach(), arena_fd, copy_bytes, config.slot_bytes, heap_bytes
            )
            self.client.in_process = self.in_process
        except BaseException:
            child.close()
            parent.close()
            self._log.close()
            raise
        finally:
            if arena_fd >= 0:
                os.close(arena_fd)
        self.ready = False

    def log(self) -> str:
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def describe_exit(self, wait: float = 0.2) -> str:
        """'' while the agent runs; how it ended otherwise."""
        if self.proc is None:
            return ""  # in process: its errors arrive as events
        try:
            code = self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return ""
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        tail = self.log()[-400:]
        return f"the data-plane agent (pid {self.proc.pid}) ended: {how}" + (
            f"; it said: {tail}" if tail else ""
        )

    def wait(self, what: str, timeout: float) -> int:
        return int(self.client.wait_for(what, timeout))

    def registrations(self) -> tuple[int, int]:
        """(hits, misses) of the agent's registration caches. A process agent registers the
        arena once, before it reports ready, and nothing after; an in-process one also
        registers the user memory it sends, so it is asked again after each send."""
        try:
            st = self.client.stats(2.0)
        except GenieError:
            return 0, 0
        return int(st.get("registration_hits", 0)), int(st.get("registration_misses", 0))

    def close(self) -> None:
        try:
            self.client.close(0.5)
        except GenieError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def track_storages(views: list[memoryview]) -> None:
    """In process, a tensor's memory is registered where it is: make freeing its storage drop
    that registration (a tensor's ``.numpy()`` keeps the tensor as the array's base)."""
    import torch

    for v in views:
        base = getattr(v.obj, "base", None)
        if isinstance(base, torch.Tensor):
            _C._dataplane_track_storage(base)


def require_dpdk() -> None:
    if not available():
        raise UnsupportedOperationError(
            f"genie: the dpdk transport is unavailable: {unavailable_reason()}"
        )
