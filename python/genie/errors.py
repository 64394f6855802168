"""genie's exception hierarchy. Errors from the compiled core are translated once, at the
pybind11 boundary (see csrc/bindings/module.cpp, _set_error_hook), into these classes."""

from __future__ import annotations

__all__ = [
    "GenieError",
    "ExecutionError",
    "UnsupportedOperationError",
    "RemoteError",
    "TransportError",
    "ProtocolError",
    "GraphValidationError",
]


class GenieError(RuntimeError):
    """Base class of every error genie raises on purpose."""


class ExecutionError(GenieError):
    """A recorded op failed when the graph ran (names the op and its input shapes)."""


class UnsupportedOperationError(GenieError, NotImplementedError):
    """Genie cannot capture or run this yet; the message says why."""


class RemoteError(GenieError):
    """A remote server answered a request with an error."""


class TransportError(GenieError, ConnectionError):
    """The peer is gone or unreachable."""


class ProtocolError(GenieError):
    """A message did not follow the wire protocol."""


class GraphValidationError(GenieError, ValueError):
    """A graph or plan is not self-consistent (dangling reference, missing input...)."""


_BY_KIND = {
    "execution": ExecutionError,
    "unsupported": UnsupportedOperationError,
    "remote": RemoteError,
    "transport": TransportError,
    "protocol": ProtocolError,
}


def _from_core(kind: str, message: str) -> GenieError:
    return _BY_KIND.get(kind, GenieError)(message)
