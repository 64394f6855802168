"""The DPDK transport between two fresh processes (tests/dataplane_peer.py), over net_memif:
tensors arrive intact, injected losses are repaired by retransmission, and a peer that dies
leaves the other with a TransportError in bounded time, never a hang or a crash.

DPDK tests run one at a time (each brings up two EAL instances on a 2-core machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.dpdk

PEER = str(Path(__file__).with_name("dataplane_peer.py"))
MB = 1 << 20


class Peer:
    """A dataplane_peer.py process and the JSON lines it printed."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, PEER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.events: list[dict] = []

    def next_event(self, timeout: float) -> dict:
        """The next JSON line; fails the test when none comes in time."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = self.proc.stdout.readline()
                if not line:
                    break
                event = json.loads(line)
                self.events.append(event)
                return event
        pytest.fail(f"no event from {self.proc.args[2]} in {timeout}s; stderr: {self.stderr()}")

    def finish(self, timeout: float) -> int:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"{self.proc.args[2]} did not finish in {timeout}s: {self.stderr()}")
        self.events += [json.loads(line) for line in out.splitlines() if line.strip()]
        return self.proc.returncode

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return (self.proc.stderr.read() or "")[-2000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def env(monkeypatch):
    e = dict(os.environ)
    e["GENIE_DPDK_MIN_PAYLOAD"] = "0"  # every payload on the data plane
    e["GENIE_DPDK_PEER_TIMEOUT"] = "3"
    return e


def start_pair(server_args: list[str], client_args, env_server, env_client):
    with tempfile.TemporaryDirectory() as d:
        port_file = os.path.join(d, "port")
        server = Peer([server_args[0], port_file, *server_args[1:]], env_server)
        deadline = time.monotonic() + 60
        while not os.path.exists(port_file):
            if server.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server peer did not start: {server.stderr()}")
            time.sleep(0.02)
        port = Path(port_file).read_text()
    client = Peer([client_args[0], port, *client_args[1:]], env_client)
    return server, client


def run_pair(server_args: list[str], client_args, env_server, env_client, *, timeout: float):
    """Start a server and a client peer and wait until both have finished cleanly (the client
    within `timeout` seconds); their events are then in `.events`."""
    server, client = start_pair(server_args, client_args, env_server, env_client)
    try:
        assert client.finish(timeout) == 0, client.stderr()
        assert server.finish(30) == 0, server.stderr()
    finally:
        client.kill()
        server.kill()
    return server, client


def agent_gone(pid: int | None, timeout: float = 10.0) -> bool:
    if pid is None:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("loss", [False, True], ids=["lossless", "injected-loss"])
def test_two_processes_exchange_tensors_intact(env, loss):
    """1 MB, 16 MB and 256 MB tensors go client -> server -> client over the data plane with
    identical bytes; with 2% of chunks dropped on purpose, retransmission repairs every one."""
    sizes = [1 * MB, 16 * MB, 256 * MB]
    if loss:
        env["GENIE_DPDK_OPTIONS"] = "loss_rate=0.02 loss_seed=7 payload_checksum=1 rto_ms=5"
        sizes = [1 * MB, 16 * MB]
    arg = ",".join(map(str, sizes))
    server, client = run_pair(["server", arg], ["client", arg], env, env, timeout=180)
    echoes = [e for e in client.events if e.get("event") == "echo"]
    received = [e for e in server.events if e.get("event") == "received"]
    assert [e["bytes"] for e in echoes] == sizes
    for echo, got in zip(echoes, received, strict=True):
        assert echo["plane"] == "up" and got["plane"] == "up"  # not the TCP fallback
        assert echo["sha256"] == got["sha256"] == echo["server_sha256"]
        assert echo["echo_equal"]
    stats = next(e["stats"] for e in client.events if e.get("event") == "stats")
    assert stats["bytes_sent"] >= sum(sizes)
    if loss:
        assert stats["chunks_dropped"] > 0
        assert stats["chunks_retransmitted"] >= stats["chunks_dropped"]
    else:
        assert stats["chunks_retransmitted"] == 0


@pytest.mark.parametrize("victim", ["receiver", "sender", "receiver-agent", "sender-agent"])
def test_a_killed_peer_is_a_transport_error_in_bounded_time(env, victim):
    """A client streams 64 MB frames to a server; SIGKILL one side mid-stream: its process, or
    only its data-plane agent (the abrupt death that made memif's sender crash in FIELD-NOTES).
    The other side raises TransportError within seconds, never hangs, never crashes, and no
    agent is left behind."""
    server, client = start_pair(["hold"], ["stream", str(64 * MB)], env, env)
    try:
        connected = client.next_event(60)
        accepted = server.next_event(60)
        assert accepted["plane"] == connected["plane"] == "up"
        for _ in range(3):  # the stream is flowing
            assert client.next_event(60)["event"] == "sent"
        side = victim.removesuffix("-agent")
        dead, survivor = (server, client) if side == "receiver" else (client, server)
        killed_at = time.monotonic()
        if victim.endswith("-agent"):
            os.kill((accepted if side == "receiver" else connected)["agent"], signal.SIGKILL)
        else:
            dead.proc.send_signal(signal.SIGKILL)
            dead.proc.wait()
        code = survivor.finish(30)
        waited = time.monotonic() - killed_at
    finally:
        client.kill()
        server.kill()
    error = survivor.events[-1]
    assert code == 3, (code, survivor.events[-3:], survivor.stderr())  # an error, not a crash
    assert error["kind"] == "TransportError", error
    assert "data plane" in error["error"] or "closed the connection" in error["error"], error
    assert waited < 15, waited
    assert agent_gone(accepted["agent"]) and agent_gone(connected["agent"])


@pytest.mark.parametrize("memory", ["arena", "torch"])
def test_payloads_in_arena_memory_travel_without_a_copy(env, memory):
    """Tensors from the transport's arena (host_buffer) are sent from and received into where
    they are: the stats count 0 bytes copied on either side. Each received tensor keeps its
    bytes while later payloads arrive, its block goes back to the heap when it dies, and it stays
    readable after the connection closes. Ordinary torch memory takes the one copy per side,
    and the stats say so."""
    sizes = [1 * MB, 16 * MB, 64 * MB]
    arg = ",".join(map(str, sizes))
    server, client = run_pair(
        ["arena-server", arg], ["arena-client", arg, memory], env, env, timeout=180
    )
    echoes = [e for e in client.events if e.get("event") == "echo"]
    assert [e["bytes"] for e in echoes] == sizes
    for echo in echoes:
        assert echo["plane"] == "up" and echo["echo_equal"]
        assert echo["sha256"] == echo["server_sha256"]
    total = sum(sizes)
    srv = next(e for e in server.events if e.get("event") == "arena")
    # The server receives into its arena and echoes from there: nothing copied either way.
    assert srv["kept_intact"]
    assert srv["stats"]["bytes_copied"] == 0
    assert srv["arena"]["received_in_place"] == srv["arena"]["sent_in_place"] == total
    cli = next(e for e in client.events if e.get("event") == "arena")
    assert cli["kept_intact"]
    assert next(e for e in client.events if e.get("event") == "closed")["last_equal"]
    if memory == "arena":
        assert cli["stats"]["bytes_copied_sending"] == 0
        assert cli["stats"]["bytes_copied_receiving"] == 0
        assert cli["arena"]["sent_in_place"] == cli["arena"]["received_in_place"] == total
        assert cli["heap_used_held"] >= 2 * total  # every sent and received tensor still held
        assert cli["heap_used_freed"] == sizes[-1]  # only the one still referenced
    else:
        assert cli["stats"]["bytes_copied_sending"] == total
        assert cli["stats"]["bytes_copied_receiving"] == total
        assert cli["arena"]["sent_in_place"] == cli["arena"]["received_in_place"] == 0


@pytest.mark.parametrize("server_mode", ["agent", "in-process"])
def test_in_process_endpoint_sends_torch_memory_in_place(env, server_mode):
    """With GENIE_DPDK_IN_PROCESS=1 the client's endpoint runs on a thread of its own process
    (no agent process): ordinary torch tensors travel both ways with 0 bytes copied, each sent
    tensor is registered on its first send and hits on the next, and freeing it drops the
    registration. The server runs either mode: the two meet on the wire."""
    sizes = [1 * MB, 1 * MB, 16 * MB, 16 * MB]
    arg = ",".join(map(str, sizes))
    env_client = {**env, "GENIE_DPDK_IN_PROCESS": "1"}
    env_server = {**env, "GENIE_DPDK_IN_PROCESS": "1" if server_mode == "in-process" else "0"}
    server, client = run_pair(
        ["arena-server", arg], ["inproc-client", arg], env_server, env_client, timeout=120
    )
    echoes = [e for e in client.events if e.get("event") == "echo"]
    assert [e["bytes"] for e in echoes] == sizes
    assert all(e["echo_equal"] and e["plane"] == "up" for e in echoes)
    srv = next(e for e in server.events if e.get("event") == "arena")
    assert srv["kept_intact"] and srv["stats"]["bytes_copied"] == 0
    done = next(e for e in client.events if e.get("event") == "inproc")
    assert done["in_process"] and done["agent_pid"] is None
    assert done["stats"]["bytes_copied"] == 0  # torch memory, sent and received in place
    # One miss for the arena, one per distinct tensor; every resend hits.
    assert done["stats"]["registrations_missed"] == 1 + len(set(sizes))
    assert done["stats"]["registrations_hit"] == len(sizes) - len(set(sizes))
    assert done["registered_bytes_held"] >= done["registered_bytes_freed"] + sum(set(sizes))


def test_uploads_to_a_device_go_from_the_heap_registered_once(env):
    """The CUDA server's upload path, run on a CPU-only machine: each payload bound for a
    non-CPU tensor lands in the arena heap in place (0 bytes copied on receipt), the heap is
    registered once through the registration cache (one miss, then hits; the "null" backend
    stands in for cudaHostRegister), and every staging block goes back to the heap."""
    frames = 3
    server, client = start_pair(["device-server", str(frames)], ["stream", str(4 * MB)], env, env)
    try:
        assert server.finish(120) == 0, server.stderr()
        client.finish(30)  # the stream ends when the server closes
    finally:
        client.kill()
        server.kill()
    done = next(e for e in server.events if e.get("event") == "device")
    assert done["stats"]["bytes_copied_receiving"] == 0
    assert done["arena"]["received_in_place"] == frames * 4 * MB
    agent_misses = 1  # the agent's registration of the arena
    assert done["stats"]["registrations_missed"] == agent_misses + 1
    assert done["stats"]["registrations_hit"] == frames - 1
    assert done["arena"]["heap_used"] == 0
