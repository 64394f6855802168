"""Executors, the remote client and server, the wire protocol and transports."""

from genie.runtime.executor import Executor, PythonExecutor, install_executor, use_local

__all__ = ["Executor", "PythonExecutor", "install_executor", "use_local"]
