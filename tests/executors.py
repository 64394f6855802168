"""The executors a model-equality test runs on: ``def test_x(executor): ...`` runs test_x on
the embedded local executor, through a loopback `genie serve` over TCP, over DPDK (where genie
was built with it; marked ``dpdk``), and on a MultiDeviceExecutor that pipelines each flush
over two CPU devices. Each test module loads it with ``pytest_plugins = ["executors"]``.

The fixture installs the executor before the test records anything and checks afterwards
that the test really ran there (a test that never flushed would otherwise pass everywhere).
Plain asserts (PYTEST_DONT_REWRITE: test modules import it before pytest could rewrite it).
"""

from __future__ import annotations

import pytest
import torch

import genie
from genie.runtime.executor import install_executor
from genie.runtime.loopback import LoopbackServer
from genie.runtime.multi_device import MultiDeviceExecutor
from genie.runtime.remote import connect
from genie.scheduler import DeviceSpec, GraphCostEstimator, NetworkTopology, Scheduler

EXECUTORS = [
    "local",
    "remote-tcp",
    pytest.param("remote-dpdk", marks=pytest.mark.dpdk),
    "multi-device",
]


def two_cpu_topology() -> NetworkTopology:
    """Two CPU devices linked to each other and to the client."""
    topo = NetworkTopology()
    for name in ("cpu0", "cpu1"):
        topo.add_device(name, DeviceSpec.cpu(cores=2, memory_bytes=8 << 30))
        topo.add_link("client", name, bandwidth_gbps=160.0, latency_us=2)
    topo.add_link("cpu0", "cpu1", bandwidth_gbps=80.0, latency_us=5)
    return topo


@pytest.fixture(scope="module")
def tcp_server():
    # The same thread count as this process, so that CPU kernels reduce in eager's order.
    srv = LoopbackServer(threads=torch.get_num_threads())
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def dpdk_server():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENIE_DPDK_MIN_PAYLOAD", "0")  # every payload on the data plane
        srv = LoopbackServer(threads=torch.get_num_threads(), extra_args=["--transport", "dpdk"])
        try:
            yield srv
        finally:
            srv.close()


@pytest.fixture(params=EXECUTORS)
def executor(request):
    """The name of the executor this test runs on, installed for its duration."""
    kind = request.param
    client = None
    if kind == "local":
        genie.configure(local_device="cpu")
        before = genie.stats().get("flushes", 0)

        def ran() -> bool:
            return genie.stats().get("flushes", 0) > before

    elif kind.startswith("remote"):
        srv = request.getfixturevalue("tcp_server" if kind == "remote-tcp" else "dpdk_server")
        transport = "dpdk" if kind == "remote-dpdk" else "tcp"
        if transport == "dpdk":
            request.getfixturevalue("monkeypatch").setenv("GENIE_DPDK_MIN_PAYLOAD", "0")
        client = connect(srv.address, token=srv.token, transport=transport)

        def ran() -> bool:
            return client.counters["runs"] > 0

    else:
        topology = two_cpu_topology()
        scheduler = Scheduler(GraphCostEstimator(), topology, strategy="pipeline")
        multi = MultiDeviceExecutor(
            {d: "cpu" for d in topology.device_names}, topology=topology, scheduler=scheduler
        )
        install_executor(multi)

        def ran() -> bool:
            return multi.last_plan is not None

    try:
        yield kind
        genie.synchronize()
        assert ran(), f"the test ran nothing on the {kind} executor"
    finally:
        genie.configure(local_device="cpu")
        if client is not None:
            client.close()
