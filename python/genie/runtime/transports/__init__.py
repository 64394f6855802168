"""Transports behind one interface (see base.py). TCP is always available; other backends
(DPDK) register here by name and are imported lazily."""

from __future__ import annotations

import importlib

from genie.errors import UnsupportedOperationError
from genie.runtime.transports.base import (
    Frame,
    Listener,
    Transport,
    TransportStats,
    default_spin_us,
)
from genie.runtime.transports.tcp import TcpListener, TcpTransport, parse_address

__all__ = [
    "Frame",
    "Listener",
    "TcpListener",
    "TcpTransport",
    "Transport",
    "TransportStats",
    "available",
    "connect",
    "default_spin_us",
    "parse_address",
]

# name -> (module, transport class, listener class)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "tcp": ("genie.runtime.transports.tcp", "TcpTransport", "TcpListener"),
    "dpdk": ("genie.runtime.transports.dpdk", "DpdkTransport", "DpdkListener"),
}


def _backend(name: str):
    try:
        module, transport, listener = _BACKENDS[name]
    except KeyError:
        raise UnsupportedOperationError(
            f"genie: unknown transport {name!r}; known: {', '.join(sorted(_BACKENDS))}"
        ) from None
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UnsupportedOperationError(
            f"genie: the {name} transport is not available in this build ({e})"
        ) from e
    return getattr(mod, transport), getattr(mod, listener)


def available() -> list[str]:
    """Transports this process can use."""
    out = []
    for name in _BACKENDS:
        try:
            _backend(name)
        except UnsupportedOperationError:
            continue
        out.append(name)
    return out


def connect(address: str, *, kind: str = "tcp", timeout: float | None = 10.0) -> Transport:
    transport_cls, _ = _backend(kind)
    return transport_cls.connect(address, timeout=timeout)


def listen(host: str, port: int, *, kind: str = "tcp", **kw) -> Listener:
    _, listener_cls = _backend(kind)
    return listener_cls(host, port, **kw)
