"""Selecting a remote executor: ``genie.connect`` / ``genie.disconnect``, the environment
(``GENIE_SERVER``, ``GENIE_TOPOLOGY``, ``GENIE_TOKEN``) and topology files. It sits above the
single-server client and the multi-device executor, which import neither it nor each other's
module-level names."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from genie.errors import GenieError
from genie.runtime import protocol as P
from genie.runtime.remote.client import RemoteExecutor

__all__ = ["active", "connect", "connect_from_env", "disconnect", "servers_from_topology"]

_active: RemoteExecutor | None = None  # the client genie.connect installed, for disconnect()


def connect(
    address: str | list | None = None,
    token: str | bytes | None = None,
    *,
    timeout: float | None = None,
    transport: str | None = None,
    install: bool = True,
    speculate: bool | None = None,
    early_uploads: bool | None = None,
) -> RemoteExecutor:
    """Open a session with the genie server at `address` (default ``$GENIE_SERVER``) and, with
    `install`, run every following flush there. The token defaults to ``$GENIE_TOKEN`` (or the
    file ``$GENIE_TOKEN_FILE``); `timeout` (seconds one reply may take) to ``$GENIE_TIMEOUT``
    or 600; `transport` to ``$GENIE_TRANSPORT`` or "tcp"; `speculate` (start a program on the
    server before its recording ends when it looks like the last one, Note: [Client
    speculation]) to ``$GENIE_SPECULATE`` or on; `early_uploads` (send a CPU tensor's bytes at
    ``.to()``, not at the flush, Note: [Early uploads]) to ``$GENIE_EARLY_UPLOADS`` or on.
    Connect before creating remote
    tensors: what the previous executor held is dropped. ``disconnect()`` goes back to local.

    A list of addresses (``["gpu1:7070", "gpu2:7070"]``, or entries as a topology file's
    ``servers`` has them) connects to every server and schedules each flush over them (a
    MultiDeviceExecutor, each server's device and memory as it reports them); the servers
    move tensors between themselves (Note: [Server-to-server moves])."""
    global _active
    if isinstance(address, (list, tuple)):
        from genie.runtime.executor import install_executor
        from genie.runtime.multi_device import MultiDeviceExecutor

        ex = MultiDeviceExecutor.from_servers(list(address), token=P.resolve_token(token))
        if install:
            install_executor(ex, ex.device_type)
            previous, _active = _active, ex
            if previous is not None:
                previous.close()
        return ex
    if timeout is None:
        timeout = float(os.environ.get("GENIE_TIMEOUT", "600"))
    transport = transport or os.environ.get("GENIE_TRANSPORT", "tcp")
    address = address or os.environ.get("GENIE_SERVER")
    if not address:
        raise GenieError(
            "genie: no server address; pass one to genie.connect() or set GENIE_SERVER=host:port"
        )
    token = P.resolve_token(token)
    if token is None:
        raise GenieError(
            f"genie: no token for the server at {address}; pass token= or set GENIE_TOKEN "
            "(the token the server was started with: genie serve --token-file FILE)"
        )
    client = RemoteExecutor(
        address,
        token,
        timeout=timeout,
        transport=transport,
        speculate=speculate,
        early_uploads=early_uploads,
    )
    if install:
        from genie.runtime.executor import install_executor

        install_executor(client, target_device_type=client.device_type)
        previous, _active = _active, client
        if previous is not None:
            previous.close()
    return client


def active() -> RemoteExecutor | None:
    """The session ``genie.connect`` installed, or None while flushes run locally. A session
    its owner closed (``client.close()`` rather than ``genie.disconnect()``) is no longer
    it; one that was lost still is, so that using it raises what happened to it."""
    global _active
    if _active is not None and getattr(_active, "closed", False):
        _active = None
    return _active


def disconnect() -> None:
    """Close the session genie.connect opened and go back to the local executor."""
    global _active
    from genie.runtime.executor import use_local

    use_local()
    if _active is not None:
        _active.close()
        _active = None


def servers_from_topology(path: str) -> list[dict[str, Any]]:
    """Servers listed in a topology file: JSON ``{"servers": [{"address": "host:port",
    "token": "..." | "token_file": "...", ...}]}`` (or a bare list of such entries)."""
    with open(path) as f:
        data = json.load(f)
    servers = data.get("servers", []) if isinstance(data, dict) else data
    out = []
    for s in servers:
        if isinstance(s, str):
            s = {"address": s}
        if not isinstance(s, dict) or "address" not in s:
            raise GenieError(f'genie: {path}: every server needs an "address": host:port')
        out.append(s)
    return out


def _is_server_process() -> bool:
    if os.environ.get("GENIE_ROLE") == "server":
        return True
    argv = sys.argv
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.startswith("genie.runtime.server"):
        return True
    return (
        len(argv) > 1 and os.path.basename(argv[0]) in ("genie", "genie.exe") and argv[1] == "serve"
    )


def connect_from_env():
    """What ``import genie`` calls. ``GENIE_SERVER`` names one server: connect to it.
    ``GENIE_TOPOLOGY`` names a topology file: a TOML cluster description
    (genie.NetworkTopology; devices with an ``endpoint`` are servers) or a JSON server list;
    with more than one device every flush is scheduled over them (MultiDeviceExecutor),
    with one server it is a plain connection. Neither set: the local executor stays."""
    if _is_server_process():
        return None
    address = os.environ.get("GENIE_SERVER")
    if address:
        return connect(address)
    path = os.environ.get("GENIE_TOPOLOGY")
    if not path:
        return None
    from genie.runtime.executor import install_executor
    from genie.runtime.multi_device import MultiDeviceExecutor

    if path.endswith(".toml"):
        from genie.scheduler import NetworkTopology

        ex = MultiDeviceExecutor.from_topology(
            NetworkTopology.from_file(path), token=P.resolve_token()
        )
        install_executor(ex, ex.device_type)
        return ex
    servers = servers_from_topology(path)
    if not servers:
        raise GenieError(f"genie: {path} lists no servers")
    if len(servers) == 1:
        s = servers[0]
        return connect(s["address"], P.resolve_token(s.get("token"), s.get("token_file")))
    ex = MultiDeviceExecutor.from_servers(servers, token=P.resolve_token())
    install_executor(ex, ex.device_type)
    return ex
