"""Faults: clients and servers that die, requests that fail, shutdown, and how the remote
executor is selected. A failure reaches the user as a genie error that says what to do, never
as a hang, and one client's failure never stops the server serving the others."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from remote_fixtures import RawClient, free_port

import genie
from genie.errors import ExecutionError, RemoteError, TransportError
from genie.runtime import protocol as P
from genie.runtime.loopback import LoopbackServer
from genie.runtime.remote import connect, connect_from_env, disconnect, servers_from_topology

pytest_plugins = ["remote_fixtures"]

DEVICE = "remote_accelerator:0"


def _wait(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _long_program(n: int = 1200, steps: int = 40):
    """Recorded work that takes a second or more on the server's CPU."""
    x = torch.randn(n, n, device=DEVICE) / n**0.5
    y = x
    for _ in range(steps):
        y = (y @ x).tanh()
    return y


def test_failing_op_reports_the_op_and_the_session_goes_on(remote):
    table = torch.randn(10, 4)
    ids = torch.tensor([3, 12])  # 12 is out of range: only the kernel on the server can tell
    with pytest.raises(ExecutionError, match=r"index_select.*\[10, 4\].*out of range"):
        torch.index_select(table.to(DEVICE), 0, ids.to(DEVICE)).cpu()
    x = torch.randn(3, 3)
    assert torch.equal((x.to(DEVICE) + 1).cpu(), x + 1)  # the same session still works


def test_memory_limit_is_an_error_not_a_crash():
    with LoopbackServer(memory_limit="4MiB", threads=1) as srv:
        client = connect(srv.address, token=srv.token)
        try:
            with pytest.raises(RemoteError, match="limit of 4194304 bytes per session"):
                torch.ones(2048, 2048, device=DEVICE).sum().cpu()  # a 16 MiB intermediate
            assert torch.ones(16, 16, device=DEVICE).sum().item() == 256
        finally:
            genie.configure(local_device="cpu")
            client.close()


def test_client_killed_mid_upload_frees_its_session(server):
    watcher = RawClient(server.address, server.token)
    base = watcher.request({"t": "stats"})["server"]
    code = f"""
        import sys, time
        from genie.runtime import protocol as P
        from genie.runtime.transports.tcp import TcpTransport
        from genie.runtime.transports.base import pack_prefix
        t = TcpTransport.connect({server.address!r})
        P.client_handshake(t, {server.token!r}.encode())
        n = 64 << 20
        header = P.pack({{"t": "upload", "up": [[1, n, 0, n, True]]}})
        t._sock.sendall(pack_prefix(P.PROTOCOL_VERSION, P.REQUEST, len(header), n) + header)
        chunk = b"\\1" * (1 << 20)
        for i in range(8):
            t._sock.sendall(chunk)
        print("uploading", flush=True)
        while True:  # the rest never comes: killed mid-upload
            time.sleep(0.1)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "uploading"
        assert _wait(
            lambda: (
                watcher.request({"t": "stats"})["server"]["connections"] == base["connections"] + 1
            )
        )
    finally:
        proc.kill()
        proc.wait()
    assert _wait(
        lambda: watcher.request({"t": "stats"})["server"]["connections"] == base["connections"]
    )
    assert watcher.request({"t": "stats"})["server"]["resident_bytes"] == base["resident_bytes"]
    watcher.close()
    client = connect(server.address, token=server.token)
    try:
        assert torch.equal((torch.ones(3, device=DEVICE) * 2).cpu(), torch.full((3,), 2.0))
    finally:
        genie.configure(local_device="cpu")
        client.close()


def test_server_killed_mid_request_gives_a_clear_error_not_a_hang():
    srv = LoopbackServer(threads=1)
    client = connect(srv.address, token=srv.token)
    try:
        y = _long_program()
        errors: list[BaseException] = []

        def materialize():
            try:
                y.cpu()
            except BaseException as e:  # noqa: BLE001 - inspected below
                errors.append(e)

        th = threading.Thread(target=materialize)
        started = time.monotonic()
        watcher = RawClient(srv.address, srv.token)
        th.start()
        # The stats request itself keeps its own session busy: wait for a second busy one.
        assert _wait(lambda: watcher.request({"t": "stats"})["server"]["busy_sessions"] >= 2)
        srv.kill()
        watcher.close()
        th.join(30)
        assert not th.is_alive(), "the client hung after the server died"
        assert time.monotonic() - started < 30
        assert len(errors) == 1 and isinstance(errors[0], TransportError), errors
        msg = str(errors[0])
        assert srv.address in msg and "genie serve" in msg
        with pytest.raises(TransportError, match="lost the genie server"):
            (torch.ones(2, device=DEVICE) + 1).cpu()  # later work fails fast, same advice
    finally:
        genie.configure(local_device="cpu")
        client.close()
        srv.close()


def test_sigterm_finishes_the_request_in_flight_then_exits():
    srv = LoopbackServer(threads=1)
    client = connect(srv.address, token=srv.token)
    try:
        torch.manual_seed(0)
        y = _long_program(steps=20)
        result: list[torch.Tensor] = []
        th = threading.Thread(target=lambda: result.append(y.cpu()))
        watcher = RawClient(srv.address, srv.token)
        th.start()
        assert _wait(lambda: watcher.request({"t": "stats"})["server"]["busy_sessions"] >= 2)
        watcher.close()
        srv.proc.send_signal(signal.SIGTERM)
        th.join(60)
        assert result and result[0].shape == (1200, 1200)  # answered, not cut off
        assert srv.proc.wait(30) == 0
        with pytest.raises(TransportError, match="genie serve"):
            torch.ones(2, device=DEVICE).cpu()
    finally:
        genie.configure(local_device="cpu")
        client.close()
        srv.close()


def test_connecting_to_nothing_says_what_to_do():
    with pytest.raises(TransportError, match="cannot connect.*Is `genie serve` running"):
        connect(f"127.0.0.1:{free_port()}", token="x")


def test_failure_in_one_session_leaves_the_others_running(server):
    other = RawClient(server.address, server.token)
    bad = RawClient(server.address, server.token)
    body = P.pack([["aten::add.Tensor", [[1, 0], [1, 1]], [[0, "float32", [2], [1], 0, 8]] * 2,
                    [[1, "float32", [2], [1], 0, 8]], [-1], [], [1], False]])  # fmt: skip
    from genie.runtime.program import program_key as _key

    reply = bad.request({"t": "run", "key": _key(body), "prog": body, "bind": [10, 11]})
    assert reply["ok"] is False and "not resident" in reply["msg"]
    bad.send_raw(b"garbage garbage garbage!")
    assert bad.closed_by_peer()
    bad.close()
    assert other.request({"t": "hello"})["ok"] is True
    other.close()


# -- selecting the remote executor --------------------------------------------------------
def test_connect_from_env_and_disconnect(server, monkeypatch):
    monkeypatch.setenv("GENIE_SERVER", server.address)
    monkeypatch.setenv("GENIE_TOKEN", server.token)
    client = connect_from_env()
    try:
        assert client is not None
        assert genie._C._executor_name() == client.name
        assert client.name.startswith(f"remote:{server.address}/cpu")
        assert torch.equal((torch.arange(4, device=DEVICE) * 2).cpu(), torch.arange(4) * 2)
    finally:
        disconnect()
    assert genie._C._executor_name().startswith("local:")


def test_connect_from_a_topology_file(server, monkeypatch, tmp_path):
    topo = tmp_path / "topology.json"
    topo.write_text(json.dumps({"servers": [{"address": server.address, "token": server.token}]}))
    monkeypatch.delenv("GENIE_SERVER", raising=False)
    monkeypatch.setenv("GENIE_TOPOLOGY", str(topo))
    assert servers_from_topology(str(topo))[0]["address"] == server.address
    client = connect_from_env()
    try:
        assert client is not None and genie._C._executor_name() == client.name
    finally:
        disconnect()


def test_without_genie_server_the_local_executor_stays(monkeypatch):
    monkeypatch.delenv("GENIE_SERVER", raising=False)
    monkeypatch.delenv("GENIE_TOPOLOGY", raising=False)
    assert connect_from_env() is None
    assert genie._C._executor_name().startswith("local:")


def test_env_selects_the_server_for_an_unchanged_script(server):
    """GENIE_SERVER/GENIE_TOKEN alone run an unchanged script remotely: `import genie` connects."""
    env = {**os.environ, "GENIE_SERVER": server.address, "GENIE_TOKEN": server.token}
    code = """
        import torch, genie
        x = torch.randn(8, 8)
        assert torch.equal((x.to("remote_accelerator:0") @ x.to("remote_accelerator:0")).cpu(), x @ x)
        print(genie._C._executor_name())
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(f"remote:{server.address}")


def test_serve_without_a_token_makes_one_and_says_so(tmp_path):
    """`genie serve` never runs open: with no token given it generates one and prints the
    GENIE_TOKEN clients need; that token then works."""
    port_file = tmp_path / "port"
    env = {k: v for k, v in os.environ.items() if k not in ("GENIE_TOKEN", "GENIE_SERVER")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "genie.runtime.server", "--port", "0", "--port-file", str(port_file)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = [proc.stderr.readline() for _ in range(2)]
        token_line = next(line for line in lines if "GENIE_TOKEN=" in line)
        token = token_line.strip().split("GENIE_TOKEN=")[1]
        assert _wait(port_file.exists)
        c = RawClient(f"127.0.0.1:{port_file.read_text()}", token)
        assert c.request({"t": "hello"})["ok"] is True
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_uploads_bigger_than_a_message_are_split():
    with LoopbackServer(max_message="256KiB", threads=1) as srv:
        client = connect(srv.address, token=srv.token)
        try:
            w = torch.randn(512, 512)  # 1 MiB: four messages
            x = torch.randn(3, 512)
            assert torch.equal((x.to(DEVICE) @ w.to(DEVICE)).cpu(), x @ w)
            assert client.counters["uploads"] >= 4
        finally:
            genie.configure(local_device="cpu")
            client.close()


# -- Note: [Large uploads] --------------------------------------------------------------------
def test_a_large_upload_reports_progress_and_equals_eager(server, monkeypatch, caplog):
    """Uploads past GENIE_UPLOAD_PROGRESS say how far they are (a log line at INFO when stderr
    is not a terminal) and go in GENIE_UPLOAD_CHUNK pieces; the result is eager's. (Uploads
    at the flush: early ones are test_remote_uploads.py's.)"""
    monkeypatch.setenv("GENIE_UPLOAD_CHUNK", str(1 << 18))
    monkeypatch.setenv("GENIE_UPLOAD_PROGRESS", str(1 << 20))
    client = connect(server.address, token=server.token, early_uploads=False)
    try:
        x = torch.randn(1 << 19)  # 2 MiB: 8 pieces
        with caplog.at_level(logging.INFO, logger="genie.runtime.remote.uploads"):
            y = (x.to("remote_accelerator:0") * 2).sum().cpu()
        assert torch.equal(y, (x * 2).sum())
        lines = [r.getMessage() for r in caplog.records if "uploaded" in r.getMessage()]
        assert lines and "100%" in lines[-1], caplog.text
        assert client.counters["uploads"] >= 8
    finally:
        genie.configure(local_device="cpu")
        client.close()


def test_ctrl_c_during_a_large_upload_leaves_the_session_working(server, monkeypatch):
    """SIGINT arriving while an upload's pieces are on their way is held until the frame in
    flight is answered; the partly sent tensor is released on the server, KeyboardInterrupt
    reaches the user, and the next computation in the same session equals eager."""
    monkeypatch.setenv("GENIE_UPLOAD_CHUNK", str(1 << 18))
    client = connect(server.address, token=server.token, early_uploads=False)
    try:
        real = client._upload_batch
        sent = []

        def interrupting(batch):
            real(batch)
            sent.append(len(batch))
            if len(sent) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C now

        monkeypatch.setattr(client, "_upload_batch", interrupting)
        monkeypatch.setattr(client, "max_message", 1 << 18)  # one piece per frame
        x = torch.randn(1 << 19)
        with pytest.raises(KeyboardInterrupt):
            (x.to("remote_accelerator:0") + 1).cpu()
        assert len(sent) == 1  # nothing more was sent after the interrupt
        monkeypatch.setattr(client, "_upload_batch", real)
        genie.synchronize()
        z = torch.randn(64, 8)
        assert torch.equal(
            (z.to("remote_accelerator:0") @ z.t().to("remote_accelerator:0")).cpu(), z @ z.t()
        )
        assert client.server_stats()["session"]["resident_bytes"] < x.nbytes
    finally:
        genie.configure(local_device="cpu")
        client.close()
