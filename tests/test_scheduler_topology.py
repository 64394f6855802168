"""Network topology: TOML files, code, routes over several hops, the client node."""

from __future__ import annotations

import pytest

from genie.scheduler import DeviceSpec, NetworkTopology, TopologyError

CLUSTER = """
client = "laptop"

[defaults]
bandwidth_gbps = 10
latency_us = 100

[[device]]
name = "gpu0"
type = "H100"
host = "node-a"
endpoint = "tcp://10.0.0.5:7010"

[[device]]
name = "gpu1"
type = "H100"
host = "node-a"

[[device]]
name = "l4"
type = "L4"
host = "node-b"
memory_gb = 16

[[link]]
a = "laptop"
b = "gpu0"
bandwidth_gbps = 100
latency_us = 20

[[link]]
a = "gpu0"
b = "gpu1"
kind = "nvlink4"

[[link]]
a = "gpu1"
b = "l4"
bandwidth_gb_s = 5
latency_us = 15
utilization = 0.2
"""


def test_from_file(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER)
    topo = NetworkTopology.from_file(path)
    assert topo.client == "laptop"
    assert topo.device_names == ["gpu0", "gpu1", "l4"]
    assert topo.device("gpu0").endpoint == "tcp://10.0.0.5:7010"
    assert topo.spec("gpu0").peak_flops["bf16"] == pytest.approx(989.4e12)
    assert topo.spec("l4").memory_bytes == 16 * 10**9  # override of the L4 preset
    link = topo.link("laptop", "gpu0")
    assert link.bandwidth == pytest.approx(12.5e9) and link.latency == pytest.approx(20e-6)
    assert topo.link("gpu1", "gpu0").bandwidth == pytest.approx(450e9)  # links work both ways


def test_routes_take_the_bottleneck_and_sum_latency():
    tomllib = pytest.importorskip("tomllib")
    topo = NetworkTopology.from_dict(tomllib.loads(CLUSTER))
    route = topo.path("laptop", "l4")
    assert route.hops == ("laptop", "gpu0", "gpu1", "l4")
    assert route.bandwidth == pytest.approx(5e9)
    assert route.latency == pytest.approx(20e-6 + 8e-6 + 15e-6)
    assert route.utilization == pytest.approx(0.2)
    nbytes = 10**8
    service = nbytes / 5e9
    assert topo.transfer_time(nbytes, "laptop", "l4") == pytest.approx(
        route.latency + service + service * 0.2 / 0.8
    )
    assert topo.transfer_time(nbytes, "gpu0", "gpu0") == 0.0


def test_programmatic_topology_and_defaults():
    topo = NetworkTopology()
    topo.add_device("a", DeviceSpec.a100())
    topo.add_device("b", "H200", memory_gb=100)
    topo.add_link("client", "a", bandwidth_gbps=400, latency_us=5)
    # No path between a and b: the default link applies.
    assert topo.path("a", "b").bandwidth == pytest.approx(topo.defaults.bandwidth)
    sig = topo.signature()
    topo.add_link("a", "b", kind="pcie5")
    assert topo.path("a", "b").bandwidth == pytest.approx(64e9)
    assert topo.signature() != sig  # cached schedules are keyed by it
    topo.set_link("a", "b", bandwidth=1e9)
    assert topo.transfer_time(10**9, "a", "b") == pytest.approx(1.0 + 10e-6)
    assert topo.spec("b").memory_bytes == 100 * 10**9


def test_uniform_and_local():
    topo = NetworkTopology.uniform(4, "A100", device_link="nvlink3")
    assert topo.device_names == ["gpu0", "gpu1", "gpu2", "gpu3"]
    assert topo.path("gpu1", "gpu3").hops == ("gpu1", "gpu3")
    assert topo.path("client", "gpu2").bandwidth == pytest.approx(12.5e9)
    local = NetworkTopology.local()
    assert "cpu" in local.device_names and local.spec("cpu").kind == "cpu"


@pytest.mark.parametrize(
    "data,match",
    [
        ({"device": [{"name": "x", "type": "TPU"}]}, "unknown device preset"),
        ({"device": [{"type": "H100"}]}, "has no name"),
        ({"device": [{"name": "x"}], "link": [{"a": "x", "b": "y"}]}, "unknown node 'y'"),
        ({"device": [{"name": "x", "bogus": 1}]}, "unknown device setting"),
        (
            {"device": [{"name": "x"}], "link": [{"a": "client", "b": "x", "bandwidth": -1}]},
            "bandwidth > 0",
        ),
        ({}, "no devices"),
    ],
)
def test_bad_topologies_say_what_is_wrong(data, match):
    with pytest.raises(TopologyError, match=match):
        NetworkTopology.from_dict(data)


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[device]\nname=")
    with pytest.raises(TopologyError, match="not valid TOML"):
        NetworkTopology.from_file(bad)
    with pytest.raises(TopologyError, match="cannot read"):
        NetworkTopology.from_file(tmp_path / "missing.toml")
