"""The devices a MultiDeviceExecutor drives (Note: [Server-to-server moves] for how two genie
servers move tensors between themselves): the DeviceBackend interface, an in-process
Environment, and any Executor such as a genie serve session."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from genie.errors import ExecutionError
from genie.graph.ir import Node, TensorMeta
from genie.runtime import protocol as P
from genie.runtime.remote.peers import PeerLinks
from genie.runtime.replay import Environment, byte_view, run_node

__all__ = [
    "DeviceBackend",
    "EnvironmentBackend",
    "ExecutorBackend",
    "meta_to_core",
    "node_to_core",
    "served",
    "session",
]


class DeviceBackend(Protocol):
    """One device as the multi-device executor drives it."""

    name: str
    device: torch.device

    def put_constant(self, storage: int, tensor: torch.Tensor) -> None: ...

    def run(self, nodes: list[Node]) -> None:
        """Run nodes (program order) against this device's storages."""

    def export(self, storage: int) -> torch.UntypedStorage:
        """The bytes of a resident storage (on this device)."""

    def import_(self, storage: int, data: torch.UntypedStorage) -> None:
        """Make a copy of `data` resident as `storage` here (never aliasing `data`)."""

    def view(self, meta: TensorMeta) -> torch.Tensor: ...

    def bind(self, meta: TensorMeta, value: torch.Tensor) -> None: ...

    def run_eager(self, node: Node) -> list[Any]: ...

    def has(self, storage: int) -> bool: ...

    def release(self, ids) -> None: ...

    def storage_nbytes(self, storage: int) -> int: ...

    def nbytes(self) -> int: ...

    def synchronize(self) -> None: ...


class EnvironmentBackend:
    """A device backed by an in-process replay Environment."""

    def __init__(self, name: str, env: Environment | str | torch.device):
        self.name = name
        self.env = env if isinstance(env, Environment) else Environment(env)
        self.device = self.env.device

    def put_constant(self, storage, tensor) -> None:
        self.env.put_constant(storage, tensor)

    def run(self, nodes) -> None:
        env = self.env
        for n in nodes:
            run_node(n, env)

    def export(self, storage):
        try:
            return self.env.storages[storage]
        except KeyError:
            raise ExecutionError(
                f"genie: storage {storage} is not resident on device {self.name} (plan expected it)"
            ) from None

    def import_(self, storage, data) -> None:
        flat = byte_view(data)
        if data.device == self.device:
            copy = flat.clone()
        else:
            copy = flat.to(self.device, non_blocking=False)
        self.env.storages[storage] = copy.untyped_storage()

    def view(self, meta):
        return self.env.view(meta)

    def bind(self, meta, value) -> None:
        self.env.bind(meta, value)

    def run_eager(self, node):
        return run_node(node, self.env, bind=False)

    def has(self, storage) -> bool:
        return storage in self.env.storages

    def release(self, ids) -> None:
        self.env.release(ids)

    def storage_nbytes(self, storage) -> int:
        st = self.env.storages.get(storage)
        return st.nbytes() if st is not None else 0

    def nbytes(self) -> int:
        return self.env.nbytes()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def meta_to_core(meta: TensorMeta) -> dict:
    """The recorder's dict form of a TensorMeta (inverse of ``TensorMeta.from_core``)."""
    return {
        "storage": meta.storage, "dtype": meta.dtype, "shape": list(meta.shape),
        "stride": list(meta.stride), "offset": meta.offset, "storage_nbytes": meta.storage_nbytes,
        "device": meta.device, "requires_grad": meta.requires_grad,
    }  # fmt: skip


def node_to_core(node: Node) -> dict:
    """The recorder's dict form of a Node (inverse of ``Node.from_core``)."""
    d = {
        "id": node.id, "op": node.op, "args": [tuple(a) for a in node.args],
        "inputs": [meta_to_core(t) for t in node.inputs],
        "outputs": [meta_to_core(t) for t in node.outputs],
        "output_alias": list(node.output_alias), "writes": list(node.writes),
        "fresh": list(node.fresh), "context": node.context, "eager": node.eager,
        "random": node.random, "empty_factory": False,
    }  # fmt: skip
    if node.rng_state is not None:
        d["rng_state"] = node.rng_state
    return d


class ExecutorBackend:
    """A device behind any Executor (a ``genie serve`` session: RemoteExecutor, or a
    PythonExecutor). Between two genie servers a storage moves directly (Note: [Server-to-
    server moves] in runtime/server/peers.py); to or from any other device its bytes are
    fetched as uint8 through this process and uploaded to the other side."""

    def __init__(self, name: str, executor, device: str | torch.device = "cpu"):
        self.name = name
        self.executor = executor
        self.device = torch.device(getattr(executor, "device_type", None) or device)
        self._nbytes: dict[int, int] = {}

    def put_constant(self, storage, tensor) -> None:
        self.executor.run([], {int(storage): tensor}, [])
        self._nbytes[storage] = tensor.untyped_storage().nbytes()

    def run(self, nodes) -> None:
        if nodes:
            self.executor.run([node_to_core(n) for n in nodes], {}, [])
            for n in nodes:
                for t in n.outputs:
                    self._nbytes.setdefault(t.storage, t.storage_nbytes)

    def export(self, storage):
        nbytes = self._nbytes.get(storage)
        if nbytes is None:
            raise ExecutionError(f"genie: storage {storage} is not resident on device {self.name}")
        ref = {
            "storage": storage,
            "dtype": torch.uint8,
            "shape": [nbytes],
            "stride": [1],
            "offset": 0,
            "storage_nbytes": nbytes,
            "device": 0,
            "requires_grad": False,
        }
        return self.executor.fetch(ref).contiguous().untyped_storage()

    def import_(self, storage, data) -> None:
        flat = byte_view(data).cpu().clone()
        self.put_constant(storage, flat)

    def imported(self, storage: int, nbytes: int) -> None:
        """`storage` arrived on this device from another server directly."""
        self._nbytes[storage] = nbytes

    def view(self, meta):
        return self.executor.fetch(meta_to_core(meta))

    def bind(self, meta, value) -> None:
        self.executor.bind(meta_to_core(meta), value)
        self._nbytes[meta.storage] = meta.storage_nbytes

    def run_eager(self, node):
        return self.executor.run_eager(node_to_core(node))

    def has(self, storage) -> bool:
        return storage in self._nbytes and self.executor.has(storage)

    def release(self, ids) -> None:
        mine = [i for i in ids if self._nbytes.pop(i, None) is not None]
        if mine:
            self.executor.release(mine)

    def storage_nbytes(self, storage) -> int:
        return self._nbytes.get(storage, 0)

    def nbytes(self) -> int:
        return sum(self._nbytes.values())

    def synchronize(self) -> None:
        pass


def session(endpoint: str, token_file: str | None, token):
    from genie.runtime.remote.client import RemoteExecutor

    address = endpoint.removeprefix("tcp://")
    token = P.resolve_token(None, token_file) if token_file else P.resolve_token(token)
    if token is None:
        raise ExecutionError(
            f"genie: no token for the genie server at {address}: set token_file "
            "in the topology, pass token=, or set GENIE_TOKEN"
        )
    return RemoteExecutor(address, token)


def served(backend) -> bool:
    """A device that is a genie server able to move tensors to and from other servers."""
    return isinstance(backend, ExecutorBackend) and PeerLinks.supported(backend.executor)
