"""Capture semantics: views, in-place ops, out=, aliasing, RNG, threads, data-dependent ops,
autograd, memory, materialization and errors; each compared with eager CPU."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from fakes import REMOTE, gpt2

import genie


def both(fn):
    """Run fn on CPU and on the remote device; return (eager, remote-as-cpu)."""
    return fn("cpu"), fn(REMOTE)


# -- views, in-place, out=, aliasing ---------------------------------------------------------
def test_view_and_inplace_chain():
    def prog(dev):
        x = torch.arange(24.0, device=dev).reshape(4, 6)
        v = x[1:3, ::2]  # strided view
        v.mul_(10)  # in-place through the view changes x
        t = x.t()  # transpose view
        t[0].add_(100)  # in-place on a view of a view
        x.unsqueeze(0).squeeze_(0)
        y = x.view(-1)[5:].clone()
        x.zero_()  # y is a clone: unaffected
        return torch.stack([y[:5], torch.zeros(5, device=dev)]).cpu(), x.cpu()

    (a1, a2), (b1, b2) = both(prog)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_out_variant_and_resize():
    def prog(dev):
        a = torch.arange(6.0, device=dev)
        out = torch.empty(0, device=dev)
        torch.add(a, 1, out=out)  # out= resizes an empty tensor
        torch.mul(out, 2, out=out)  # out aliases an input
        r = torch.empty(2, device=dev)
        r.resize_(3, 2).fill_(5)
        return out.cpu(), r.cpu()

    (a1, a2), (b1, b2) = both(prog)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_aliasing_between_inputs():
    def prog(dev):
        x = torch.arange(5.0, device=dev)
        x.add_(x)  # same storage as both inputs
        x[1:].copy_(x[:-1].clone())  # overlapping copy through views
        return x.cpu()

    a, b = both(prog)
    assert torch.equal(a, b)


def test_split_and_unbind_views_share_storage():
    def prog(dev):
        x = torch.arange(12.0, device=dev).reshape(3, 4)
        parts = torch.split(x, 1)
        rows = x.unbind(0)
        parts[0].fill_(-1)
        rows[2].mul_(3)
        return x.cpu()

    a, b = both(prog)
    assert torch.equal(a, b)


def test_write_after_read_hazard_is_ordered():
    """A later in-place write must not leak into an earlier read that has not run yet."""
    x = torch.ones(4, device=REMOTE)
    y = x * 2  # reads x before the write
    x.add_(5)  # only x's value is asked for first
    assert torch.equal(x.cpu(), torch.full((4,), 6.0))
    assert torch.equal(y.cpu(), torch.full((4,), 2.0))


def test_dead_code_is_never_run():
    before = genie.stats()
    x = torch.ones(8, device=REMOTE)
    for _ in range(5):
        x.exp()  # nobody keeps these
    r = (x + 1).cpu()
    after = genie.stats()
    assert torch.equal(r, torch.full((8,), 2.0))
    assert after["nodes_dropped"] - before["nodes_dropped"] >= 5


def test_results_nobody_can_reach_are_not_kept():
    """scaled_dot_product_attention drops its kernel's log-sum-exp at once: the executor is
    never asked to keep it (Note: [Dead outputs]). Called directly, with both results kept,
    the log-sum-exp is kept and equals eager's."""
    from genie import _C

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    rq, rk, rv = (t.to(REMOTE) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(rq, rk, rv).cpu()
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    (node,) = _C._last_flushed_nodes()
    assert node["output_alias"] == [-1, -2] and len(node["fresh"]) == 1
    got = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(rq, rk, rv)
    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    assert torch.equal(got[1].cpu(), want[1])
    (node,) = _C._last_flushed_nodes()
    assert node["output_alias"] == [-1, -1]
    assert torch.equal(got[0].cpu(), want[0])


# -- RNG --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1234])
def test_manual_seed_reproduces_eager_cpu(seed):
    def prog(dev):
        torch.manual_seed(seed)
        a = torch.randn(5, 7, device=dev)
        b = torch.rand(3, device=dev)
        c = torch.randint(0, 100, (6,), device=dev)
        d = torch.empty(4, 4, device=dev).normal_(2.0, 0.5)
        e = torch.nn.functional.dropout(torch.ones(10, 10, device=dev), 0.3, training=True)
        f = torch.bernoulli(torch.full((20,), 0.5, device=dev))
        g = torch.randperm(10, device=dev)
        return [t.cpu() for t in (a, b, c, d, e, f, g)]

    eager, remote = both(prog)
    for x, y in zip(eager, remote, strict=True):
        assert torch.equal(x, y)


def test_rng_state_roundtrip_and_interleaving_with_cpu():
    torch.manual_seed(7)
    a1 = torch.randn(3, device=REMOTE)
    cpu_draw = torch.randn(3)  # a separate generator, as with CUDA: remote draws don't advance it
    state = torch.remote_accelerator.get_rng_state()
    a2 = torch.randn(3, device=REMOTE)
    torch.remote_accelerator.set_rng_state(state)
    a3 = torch.randn(3, device=REMOTE)
    assert torch.equal(a2.cpu(), a3.cpu())
    torch.manual_seed(7)
    assert torch.equal(torch.randn(3), a1.cpu())
    assert torch.equal(cpu_draw, a1.cpu())
    assert not torch.equal(a1.cpu(), a2.cpu())


# -- threads ----------------------------------------------------------------------------------
def test_threads_capture_concurrently():
    results, errors = {}, []

    def work(i):
        try:
            x = torch.full((16, 16), float(i), device=REMOTE)
            for _ in range(20):
                x = x @ torch.eye(16, device=REMOTE) + 1
            results[i] = x.cpu()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, r in results.items():
        assert torch.equal(r, torch.full((16, 16), float(i + 20)))


# -- data-dependent ops -----------------------------------------------------------------------
def test_data_dependent_ops():
    def prog(dev):
        x = torch.tensor([3.0, -1.0, 0.0, 5.0, -2.0, 5.0], device=dev)
        nz = torch.nonzero(x > 0)
        u = torch.unique(x)
        ms = torch.masked_select(x, x < 1)
        bi = x[x > 0] * 2  # result feeds more lazy work
        return [t.cpu() for t in (nz, u, ms, bi)] + [bool(torch.equal(x, x))]

    eager, remote = both(prog)
    for a, b in zip(eager[:-1], remote[:-1], strict=True):
        assert torch.equal(a, b)
    assert eager[-1] == remote[-1] is True


def test_data_dependent_ops_with_host_operands():
    """A host tensor beside remote ones in an op run at once (a CPU boolean mask indexing a
    remote tensor, as CUDA allows; torch.equal against a CPU tensor) is uploaded for it and
    kept until the op has run (Note: [Inputs of an op run at once]); repeated, every value
    equals eager."""

    def prog(dev):
        x = torch.tensor([3.0, -1.0, 0.0, 5.0, -2.0, 5.0], device=dev)
        host = torch.tensor([3.0, -1.0, 0.0, 5.0, -2.0, 5.0])
        out = []
        for k in range(3):
            mask = torch.tensor([True, False, k > 0, True, False, k > 1])
            out += [(x[mask] * 2).cpu(), torch.tensor(torch.equal(x, host + k))]
        return out

    eager, remote = both(prog)
    for a, b in zip(eager, remote, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "where",
    [("cpu", REMOTE, REMOTE, None), (REMOTE, "cpu", "cpu", "cpu"), (REMOTE, REMOTE, REMOTE, "cpu")],
    ids=["host-query", "host-key-value-mask", "host-mask"],
)
def test_attention_takes_host_tensors_beside_remote_ones(where):
    """scaled_dot_product_attention with some inputs on the host (a CPU model's learned queries
    over remote features, as DETR's decoder has them in analyze()) equals eager, forward and
    the query's gradient, and under inference_mode (Note: [Host tensors in attention])."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(5, 7) > 0.3 if where[3] else None
    F = torch.nn.functional
    qe = q.clone().requires_grad_()
    ref = F.scaled_dot_product_attention(qe, k, v, attn_mask=mask)
    ref.sum().backward()
    qr = q.clone().to(where[0]).requires_grad_()
    args = (qr, k.to(where[1]), v.to(where[2]))
    m = None if mask is None else mask.to(where[3])
    out = F.scaled_dot_product_attention(*args, attn_mask=m)
    assert out.device.type == "remote_accelerator"
    assert torch.equal(out.cpu(), ref.detach())
    out.sum().backward()
    assert torch.equal(qr.grad.cpu(), qe.grad)
    with torch.inference_mode():
        out = F.scaled_dot_product_attention(q.to(where[0]), k.to(where[1]), v.to(where[2]))
        assert torch.equal(out.cpu(), F.scaled_dot_product_attention(q, k, v))


def test_integer_histograms_run_where_the_cpu_has_no_kernel_for_them():
    """HF's grouped-mm MoE layers count expert ids with an int32 histc on any device that is not
    the CPU; the CPU executor has no such kernel, so it runs as CUDA's kernel computes it (Note:
    [Integer histograms on a CPU target]). For small integers that is what a float histc
    counts; a float histc is recorded as it is."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-3, 20, (257,), generator=g, dtype=torch.int32)
    for kw in ({"bins": 16, "min": 0, "max": 15}, {"bins": 5}, {"bins": 3, "min": 4, "max": 4}):
        got = torch.histc(ids.to(REMOTE), **kw).cpu()
        assert got.dtype == torch.int32
        assert torch.equal(got, torch.histc(ids.float(), **kw).to(torch.int32)), kw
    assert torch.equal(
        torch.histc(ids.to(REMOTE).long(), bins=4, min=2, max=9).cpu(),
        torch.histc(ids.float(), bins=4, min=2, max=9).long(),
    )
    x = torch.randn(300, generator=g)
    assert torch.equal(
        torch.histc(x.to(REMOTE), bins=7, min=-1, max=1).cpu(), torch.histc(x, 7, -1, 1)
    )
    with pytest.raises(RuntimeError, match="bins must be > 0"):
        torch.histc(ids.to(REMOTE), bins=0).cpu()


def test_grouped_matmuls_stay_lazy_and_equal_eager():
    """_grouped_mm (HF's grouped-mm MoE experts) in float32: PyTorch's meta kernel takes
    bfloat16 only, so without a shape of genie's each call flushed the recording and ran at
    once. Every layout records lazily and equals eager."""
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([4, 4, 12, 16], dtype=torch.int32)
    cases = [
        (torch.randn(16, 8, generator=g), torch.randn(4, 8, 12, generator=g), offs),  # 2D x 3D
        (torch.randn(4, 12, 8, generator=g), torch.randn(8, 16, generator=g), offs),  # 3D x 2D
        (torch.randn(4, 16, 8, generator=g), torch.randn(4, 8, 12, generator=g), None),  # 3D x 3D
    ]
    genie.synchronize()
    for a, b, o in cases:
        ref = torch._grouped_mm(a, b, offs=o)
        flushes = genie.stats()["flushes"]
        got = torch._grouped_mm(
            a.to(REMOTE), b.to(REMOTE), offs=None if o is None else o.to(REMOTE)
        )
        assert got.shape == ref.shape and genie.stats()["flushes"] == flushes
        assert torch.equal(got.cpu(), ref)


def test_data_dependent_op_flushes_only_what_it_needs():
    x = torch.ones(4, device=REMOTE)
    unrelated = torch.randn(100, 100, device=REMOTE) @ torch.randn(100, 100, device=REMOTE)
    before = genie.stats()["pending_nodes"]
    _ = torch.nonzero(x)
    assert genie.stats()["pending_nodes"] >= 1, "the unrelated matmul must stay pending"
    assert before >= 1
    del unrelated


# -- autograd ---------------------------------------------------------------------------------
def test_backward_and_optimizer_step_match_eager():
    def prog(dev):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        model.to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)
        x = torch.randn(32, 8).to(dev)
        y = torch.randn(32, 1).to(dev)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().cpu() for p in model.parameters()]

    (l1, p1), (l2, p2) = both(prog)
    assert l1 == l2
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)


def test_gpt2_training_step_matches_eager():
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(0))

    def prog(dev):
        model = gpt2().train()
        model.to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(5)  # dropout masks
        out = model(ids.to(dev), labels=ids.to(dev))
        out.loss.backward()
        opt.step()
        return out.loss.item(), model.lm_head.weight.detach().cpu()

    (la, wa), (lb, wb) = both(prog)
    assert la == lb
    assert torch.equal(wa, wb)


# -- memory -----------------------------------------------------------------------------------
def test_memory_stays_flat_over_1000_forwards():
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    ).to(REMOTE)
    x = torch.randn(4, 32).to(REMOTE)
    with torch.no_grad():
        for i in range(1000):
            y = model(x).sum()
            if i % 10 == 0:
                y.item()
            if i == 100:
                gc.collect()
                genie.synchronize()
                mid = genie.stats()
        gc.collect()
        genie.synchronize()
    end = genie.stats()
    assert end["resident_storages"] <= mid["resident_storages"]
    assert end["resident_bytes"] <= mid["resident_bytes"]
    assert end["pending_nodes"] == 0
    assert end["live_storages"] <= mid["live_storages"]


_CHAIN = """
import resource, torch, genie
x = torch.ones(8 << 20).to("remote_accelerator:0")  # 32 MiB
genie.synchronize()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
h = x
for _ in range(16):
    h = h + 1
print(float(h[0].cpu()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_long_chain_frees_its_intermediates_as_it_runs():
    """Sixteen 32 MiB steps in one flush on the local executor: the process grows by a few
    steps' worth, as eager does, not by all sixteen (Note: [Dead after the flush])."""
    run = subprocess.run(
        [sys.executable, "-c", _CHAIN], capture_output=True, text=True, timeout=120, check=True
    )
    value, grew_kib = run.stdout.split()
    assert float(value) == 17.0
    assert int(grew_kib) * 1024 < 8 * (32 << 20), grew_kib


# -- materialization --------------------------------------------------------------------------
def test_materialization_methods():
    x = torch.arange(6.0).reshape(2, 3)
    r = x.to(REMOTE) * 1
    assert torch.equal(r.cpu(), x)
    assert torch.equal(r.to("cpu"), x)
    assert r[1, 2].item() == 5.0
    assert r.tolist() == x.tolist()
    assert np.array_equal(r.numpy(), x.numpy())
    assert bool(r.sum() > 0) is True
    assert float(r.sum()) == 15.0 and int(r[0, 1]) == 1


def test_repr_downloads_once():
    r = torch.arange(30.0).reshape(6, 5).to(REMOTE) + 0
    before = genie.stats()["flushes"]
    text = repr(r)
    assert genie.stats()["flushes"] - before <= 1
    assert "device='remote_accelerator:0'" in text
    assert str(torch.arange(30.0).reshape(6, 5))[:-1] in text


# -- errors -----------------------------------------------------------------------------------
def test_shape_error_is_raised_at_the_op_like_eager():
    a = torch.ones(2, 3, device=REMOTE)
    b = torch.ones(4, 5, device=REMOTE)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        a @ b


def test_failure_at_run_time_names_op_and_shapes():
    # An op whose meta kernel accepts the input but whose CPU kernel refuses it.
    x = torch.tensor([1.0, 2.0], device=REMOTE)
    idx = torch.tensor([5], device=REMOTE)
    y = x.index_select(0, idx)  # out of range: only the real kernel can tell
    with pytest.raises(genie.ExecutionError, match=r"index_select.*i64\[1\]"):
        y.cpu()
    # The error sticks to what depended on it, and the device keeps working.
    with pytest.raises(genie.ExecutionError):
        y.cpu()
    assert torch.equal((x + 1).cpu(), torch.tensor([2.0, 3.0]))


def test_modifying_a_captured_cpu_input_before_it_runs_is_an_error():
    w = torch.ones(3)
    with genie.capture():
        y = torch.zeros(3) + w  # w becomes a graph input (not copied)
    w.add_(1)
    with pytest.raises(genie.ExecutionError, match="modified in place"):
        y.cpu()
    with pytest.raises(genie.ExecutionError, match="modified in place"):
        y.cpu()
    genie.synchronize()  # nothing else is stuck behind it
    assert torch.equal((torch.ones(2, device=REMOTE) * 3).cpu(), torch.full((2,), 3.0))


# -- C++ shape functions ----------------------------------------------------------------------
@pytest.mark.parametrize("shape,normalized", [((2, 5, 8), (8,)), ((3, 4, 6), (4, 6)), ((7,), (7,))])
def test_native_layer_norm_all_outputs_match_eager(shape, normalized):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(*normalized, generator=g)
    b = torch.randn(*normalized, generator=g)
    ref = torch.native_layer_norm(x, normalized, w, b, 1e-5)
    out = torch.native_layer_norm(x.to(REMOTE), normalized, w.to(REMOTE), b.to(REMOTE), 1e-5)
    for r, o in zip(ref, out, strict=True):
        assert o.shape == r.shape and o.stride() == r.stride()
        assert torch.equal(o.cpu(), r)


def test_layer_norm_shape_mismatch_is_eager_error():
    x = torch.randn(2, 5).to(REMOTE)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        torch.nn.functional.layer_norm(x, (4,))
