"""``genie serve``: the server that runs remote_accelerator programs on this host's device.

One session per client connection, each on its own thread with its own resident storages
(weights uploaded once, KV caches, activations), all sharing one cache of validated programs.
Requests are described in Note: [Wire format] (genie/runtime/protocol.py). A bad request gets
an error reply and the session goes on; a request that breaks framing closes that connection
only; every other session keeps being served.

Run ``python -m genie.runtime.server --help`` (the same options as ``genie serve``).

  server.py       Server and ServerConfig: connections, sessions, shutdown
  session.py      Session: one client's storages and a dispatcher of its requests
  resolver.py     ProgramResolver: what a request names -> a checked program; the Preparer
  speculation.py  SpeculationSlot: a session's speculative run (start, commit, undo)
  cli.py          the ``genie serve`` command line
"""

from genie.runtime.server.cli import add_serve_arguments, main, parse_size, serve_main
from genie.runtime.server.server import Server, ServerConfig
from genie.runtime.server.session import Session

__all__ = [
    "Server",
    "ServerConfig",
    "Session",
    "add_serve_arguments",
    "main",
    "parse_size",
    "serve_main",
]
