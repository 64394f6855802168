"""The cost model: exact FLOP counts, roofline times against device figures, transfer and
queueing times, calibration from measured times."""

from __future__ import annotations

import pytest
import torch
from fakes import REMOTE
from torch.utils.flop_counter import FlopCounterMode

import genie
from genie.graph import Node, TensorMeta
from genie.scheduler import DeviceSpec, GraphCostEstimator, NetworkTopology, node_cost, op_family


def _recorded(fn, *shapes, name: str):
    """Record fn on remote tensors of `shapes`; return (the node named `name`, eager FLOPs
    per torch.utils.flop_counter on the same shapes)."""
    torch.manual_seed(0)
    host = [torch.randn(s) for s in shapes]
    with FlopCounterMode(display=False) as fc:
        fn(*host)
    remote = [h.to(REMOTE) for h in host]
    out = fn(*remote)  # noqa: F841  (alive while we look at the graph)
    nodes = [n for n in genie.get_graph().nodes if n.name == name]
    assert nodes, f"no {name} node recorded"
    return nodes[-1], fc.get_total_flops()


@pytest.mark.parametrize("m,k,n", [(64, 32, 16), (7, 13, 5), (128, 256, 512)])
def test_matmul_flops_are_exact(m, k, n):
    node, ref = _recorded(torch.mm, (m, k), (k, n), name="mm")
    cost = node_cost(node)
    assert cost.family == "matmul"
    assert cost.flops == 2 * m * k * n == ref


def test_addmm_bmm_linear_flops_are_exact():
    node, ref = _recorded(
        lambda b, x, w: torch.addmm(b, x, w), (16,), (8, 32), (32, 16), name="addmm"
    )
    assert node_cost(node).flops == 2 * 8 * 32 * 16 == ref
    node, ref = _recorded(torch.bmm, (4, 8, 32), (4, 32, 16), name="bmm")
    assert node_cost(node).flops == 2 * 4 * 8 * 32 * 16 == ref
    lin = torch.nn.functional.linear
    node, ref = _recorded(lambda x, w, b: lin(x, w, b), (2, 5, 32), (24, 32), (24,), name="addmm")
    assert node_cost(node).flops == 2 * 10 * 32 * 24 == ref


@pytest.mark.parametrize(
    "x,w,kw",
    [
        ((2, 3, 17, 17), (8, 3, 3, 3), {"stride": 2, "padding": 1}),
        ((1, 8, 16, 16), (8, 2, 3, 3), {"padding": 1, "groups": 4}),
        ((4, 16, 9, 9), (32, 16, 1, 1), {}),
        ((2, 4, 10, 10), (6, 4, 5, 5), {"dilation": 2}),
    ],
)
def test_conv_flops_are_exact(x, w, kw):
    node, ref = _recorded(
        lambda a, b: torch.nn.functional.conv2d(a, b, **kw), x, w, name="convolution"
    )
    out = node.outputs[0].shape
    expected = 2 * out[0] * w[0] * out[2] * out[3] * w[1] * w[2] * w[3]
    cost = node_cost(node)
    assert cost.family == "conv"
    assert cost.flops == expected == ref


def test_transposed_conv_flops_match_torch():
    node, ref = _recorded(
        lambda a, b: torch.nn.functional.conv_transpose2d(a, b, stride=2),
        (2, 8, 5, 5),
        (8, 4, 3, 3),
        name="convolution",
    )
    assert node_cost(node).flops == ref


def test_attention_flops():
    f = torch.nn.functional.scaled_dot_product_attention
    b, h, sq, sk, d = 2, 4, 16, 24, 8
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(b, h, sq, d).to(REMOTE),
        torch.randn(b, h, sk, d).to(REMOTE),
        torch.randn(b, h, sk, d).to(REMOTE),
    )
    out = f(q, k, v)  # noqa: F841
    node = next(n for n in reversed(genie.get_graph().nodes) if op_family(n.op) == "attention")
    assert node_cost(node).flops == 2 * b * h * sq * sk * d * 2


def test_families_and_views():
    assert op_family("aten::native_layer_norm.default") == "normalization"
    assert op_family("aten::_native_batch_norm_legit_no_training.default") == "normalization"
    assert op_family("aten::embedding.default") == "embedding"
    assert op_family("aten::cat.default") == "data_movement"
    assert op_family("aten::_softmax.default") == "reduction"
    assert op_family("aten::gelu.default") == "elementwise"
    # A view (output aliasing its input) runs no kernel and costs nothing.
    src = TensorMeta(7, torch.float32, (8, 8), (8, 1), 0, 256)
    view = Node(
        1,
        "aten::t.default",
        [("tensor", 0)],
        [src],
        [TensorMeta(7, torch.float32, (8, 8), (1, 8), 0, 256)],
        output_alias=[0],
    )
    c = node_cost(view)
    assert (c.family, c.flops, c.bytes) == ("view", 0.0, 0.0)
    assert GraphCostEstimator().node_time(view, DeviceSpec.h100()) == 0.0


def test_presets_use_published_figures():
    h100, h200, a100, l4 = DeviceSpec.h100(), DeviceSpec.h200(), DeviceSpec.a100(), DeviceSpec.l4()
    assert h100.peak_flops["bf16"] == pytest.approx(989.4e12)
    assert h100.peak_flops["fp32"] == pytest.approx(67e12)
    assert h100.memory_bandwidth == pytest.approx(3.35e12) and h100.memory_bytes == 80 * 10**9
    assert h200.peak_flops == h100.peak_flops
    assert h200.memory_bandwidth == pytest.approx(4.8e12) and h200.memory_bytes == 141 * 10**9
    assert a100.peak_flops["bf16"] == pytest.approx(312e12) and a100.peak_flops[
        "fp32"
    ] == pytest.approx(19.5e12)
    assert a100.memory_bandwidth == pytest.approx(2.039e12)
    assert l4.peak_flops["bf16"] == pytest.approx(121e12) and l4.peak_flops[
        "fp32"
    ] == pytest.approx(30.3e12)
    assert l4.memory_bandwidth == pytest.approx(300e9) and l4.memory_bytes == 24 * 10**9
    cpu = DeviceSpec.cpu(
        cores=4, gflops_per_core=10, memory_bandwidth_gb_s=20, memory_bytes=1 << 30
    )
    assert cpu.peak_flops["fp32"] == pytest.approx(40e9) and cpu.memory_bytes == 1 << 30
    assert DeviceSpec.preset("nvidia-h100").name == "H100"
    with pytest.raises(ValueError, match="unknown device preset"):
        DeviceSpec.preset("TPU")


def _node(op, ins, outs, dtype=torch.bfloat16, alias=None):
    """A hand-made node (nothing runs): tensors of the given shapes, contiguous."""

    def meta(i, shape):
        stride, acc = [], 1
        for d in reversed(shape):
            stride.insert(0, acc)
            acc *= d
        return TensorMeta(i, dtype, tuple(shape), tuple(stride), 0, acc * dtype.itemsize)

    inputs = [meta(i + 1, sh) for i, sh in enumerate(ins)]
    outputs = [meta(100 + i, sh) for i, sh in enumerate(outs)]
    return Node(
        1,
        op,
        [("tensor", i) for i in range(len(ins))],
        inputs,
        outputs,
        output_alias=alias or [-1] * len(outs),
        fresh=[o.storage for o in outputs],
    )


def test_roofline_compute_and_memory_bound():
    est = GraphCostEstimator()
    h100, a100 = DeviceSpec.h100(), DeviceSpec.a100()
    mm = _node("aten::mm.default", [(8192, 8192), (8192, 8192)], [(8192, 8192)])
    relu = _node("aten::relu.default", [(8192, 8192)], [(8192, 8192)])
    flops = 2 * 8192**3
    expect_mm = flops / (989.4e12 * h100.matmul_efficiency) + h100.launch_overhead_s
    assert est.node_time(mm, h100) == pytest.approx(expect_mm)  # compute bound
    nbytes = 2 * 8192 * 8192 * 2  # read and write bf16
    expect_relu = nbytes / (3.35e12 * h100.memory_efficiency) + h100.launch_overhead_s
    assert est.node_time(relu, h100) == pytest.approx(expect_relu)  # memory bound
    # An A100 is 989.4/312 slower for the matmul and 3.35/2.039 for the relu.
    over = h100.launch_overhead_s
    assert (est.node_time(mm, a100) - over) / (est.node_time(mm, h100) - over) == pytest.approx(
        989.4 / 312
    )
    assert (est.node_time(relu, a100) - over) / (est.node_time(relu, h100) - over) == pytest.approx(
        3.35 / 2.039
    )
    # fp32 matmuls run at the fp32 rate unless TF32 is allowed.
    assert h100.matmul_flops(torch.float32) == pytest.approx(67e12)
    assert h100.with_(allow_tf32=True).matmul_flops(torch.float32) == pytest.approx(494.7e12)
    mm32 = _node("aten::mm.default", [(8192, 8192), (8192, 8192)], [(8192, 8192)], torch.float32)
    assert est.node_time(mm32, h100) > 10 * est.node_time(mm, h100)


def test_transfer_time_is_bytes_over_bandwidth_plus_latency_with_queueing():
    topo = NetworkTopology()
    topo.add_device("a", "H100")
    topo.add_device("b", "H100")
    topo.add_link("a", "b", bandwidth=10e9, latency=20e-6)
    est = GraphCostEstimator()
    assert est.transfer_time(10**9, "a", "b", topo) == pytest.approx(0.1 + 20e-6)
    assert est.transfer_time(10**9, "a", "a", topo) == 0.0
    topo.set_link("a", "b", utilization=0.5)  # M/M/1: service time doubles
    assert est.transfer_time(10**9, "a", "b", topo) == pytest.approx(20e-6 + 0.1 / 0.5 * 0.5 + 0.1)
    topo.set_device_queue("b", 0.003)
    assert est.queueing_delay(topo.device("b")) == pytest.approx(0.003)


def test_calibration_learns_measured_times():
    est = GraphCostEstimator(smoothing=1.0)
    h100 = DeviceSpec.h100()
    torch.manual_seed(0)
    x = torch.randn(64, 64).to(REMOTE)
    y = (x @ x).relu()  # noqa: F841
    g = genie.get_graph()
    mm = next(n for n in g.nodes if n.name == "mm")
    predicted = est.node_time(mm, h100)
    v0 = est.version
    factors = est.calibrate(g, {mm.id: predicted * 3}, h100)
    assert factors["matmul"] == pytest.approx(3.0)
    assert est.node_time(mm, h100) == pytest.approx(predicted * 3)
    assert est.version != v0  # schedules cached under the old figures are not reused
    relu = next(n for n in g.nodes if n.name == "relu")
    assert est.calibration_factor(h100, "elementwise") == 1.0  # other families untouched
    assert est.node_time(relu, DeviceSpec.a100()) == GraphCostEstimator().node_time(
        relu, DeviceSpec.a100()
    )
    # Fragment-level observations spread over families by predicted share.
    est2 = GraphCostEstimator(smoothing=1.0)
    t = est2.node_time(mm, h100) + est2.node_time(relu, h100)
    est2.observe_nodes([mm, relu], h100, 2 * t)
    assert est2.node_time(mm, h100) + est2.node_time(relu, h100) == pytest.approx(2 * t)
