"""A genie server in a child process on 127.0.0.1: for ``genie demo --remote``, tests and
benchmarks. The child is ``python -m genie.runtime.server``, so this exercises exactly what
``genie serve`` runs."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from genie.errors import GenieError

logger = logging.getLogger(__name__)

__all__ = ["LoopbackServer", "loopback_session"]


class LoopbackServer:
    """``with LoopbackServer(device="cpu") as srv: genie.connect(srv.address, token=srv.token)``"""

    def __init__(
        self,
        device: str = "cpu",
        *,
        token: str | None = None,
        threads: int = 0,
        cuda_graphs: bool = True,
        memory_limit: str | None = None,
        max_message: str | None = None,
        log_level: str = "WARNING",
        extra_args: list[str] | None = None,
        startup_timeout: float = 60.0,
    ):
        self.device = device
        self.token = token or secrets.token_hex(16)
        self._dir = tempfile.TemporaryDirectory(prefix="genie-serve-")
        d = Path(self._dir.name)
        token_file = d / "token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        port_file = d / "port"
        self.log_path = d / "server.log"
        cmd = [
            sys.executable, "-m", "genie.runtime.server",
            "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
            "--token-file", str(token_file), "--device", device, "--log-level", log_level,
        ]  # fmt: skip
        if threads:
            cmd += ["--threads", str(threads)]
        if not cuda_graphs:
            cmd.append("--no-cuda-graphs")
        if memory_limit:
            cmd += ["--memory-limit", memory_limit]
        if max_message:
            cmd += ["--max-message", max_message]
        cmd += extra_args or []
        env = {k: v for k, v in os.environ.items() if k not in ("GENIE_SERVER", "GENIE_TOPOLOGY")}
        env["GENIE_ROLE"] = "server"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                self._log.close()
                raise GenieError(f"genie: the loopback server exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise GenieError(
                    f"genie: the loopback server did not start in {startup_timeout}s:\n{self.log()}"
                )
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit; returns the code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def loopback_session(device: str = "cpu", **server_options) -> Iterator:
    """Start a loopback server, route this process's flushes to it, and undo both on exit:
    what ``genie demo --remote`` runs its demo inside."""
    from genie.runtime.remote import connect, disconnect

    with LoopbackServer(device, **server_options) as srv:
        client = connect(srv.address, token=srv.token)
        try:
            yield client
        finally:
            disconnect()
