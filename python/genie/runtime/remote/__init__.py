"""The client side of remote execution.

client.py      RemoteExecutor: one session with one server behind the Executor protocol;
               it sends what the namer and the speculator decide
namer.py       ProgramNamer: how a flush is named (Note: [Program refs]) and what each run
               teaches about naming the next
speculator.py  Speculator: what to ask the server to start early (Note: [Client speculation])
connect.py     genie.connect / disconnect, the environment, topology files
"""

from genie.runtime.remote.client import RemoteExecutor
from genie.runtime.remote.connect import (
    connect,
    connect_from_env,
    disconnect,
    servers_from_topology,
)

__all__ = ["RemoteExecutor", "connect", "connect_from_env", "disconnect", "servers_from_topology"]
