"""The remote_accelerator device as a PyTorch user meets it."""

from __future__ import annotations

import pytest
import torch
from fakes import REMOTE

import genie


def test_factories_and_to():
    a = torch.zeros(2, 3, device=REMOTE)
    b = torch.ones(2, 3, device=REMOTE, dtype=torch.float64)
    c = torch.tensor([[1, 2], [3, 4]], device=REMOTE)
    d = torch.arange(6, device=REMOTE).reshape(2, 3)
    e = torch.full((2,), 7.5, device=REMOTE)
    for t in (a, b, c, d, e):
        assert t.device == torch.device(REMOTE)
        assert t.is_remote_accelerator  # generated at import
    assert torch.equal(a.cpu(), torch.zeros(2, 3))
    assert torch.equal(b.cpu(), torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(c.cpu(), torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(d.to("cpu"), torch.arange(6).reshape(2, 3))
    assert torch.equal(e.cpu(), torch.full((2,), 7.5))


def test_to_and_back_keeps_dtype_and_values():
    x = torch.randn(4, 5)
    r = x.to(REMOTE)
    assert r.dtype == x.dtype and r.shape == x.shape
    assert torch.equal(r.cpu(), x)
    assert torch.equal(x.remote_accelerator().cpu(), x)
    assert torch.equal(r.to(torch.float64).cpu(), x.to(torch.float64))


def test_upload_snapshots_the_source():
    """Eager .to() copies; changing the CPU tensor afterwards must not change the upload."""
    x = torch.ones(3)
    r = x.to(REMOTE)
    x.add_(1)
    assert torch.equal(r.cpu(), torch.ones(3))


def test_copy_from_a_strided_cpu_view_into_remote():
    x = torch.arange(24.0).reshape(4, 6)
    r = torch.zeros(3, 3, device=REMOTE)
    r.copy_(x[1:, 1::2])  # a CPU view with an offset and gaps
    assert torch.equal(r.cpu(), x[1:, 1::2])
    t = torch.zeros(6, 4, device=REMOTE)
    t[:, :2].copy_(x.t()[:, 2:4])
    assert torch.equal(t.cpu()[:, :2], x.t()[:, 2:4])


def test_module_to():
    m = torch.nn.Linear(4, 3)
    w = m.weight.detach().clone()
    m.to(REMOTE)
    assert m.weight.device.type == "remote_accelerator"
    assert isinstance(m.weight, torch.nn.Parameter)
    assert torch.equal(m.weight.cpu(), w)


def test_device_count_and_index_validation():
    assert torch.remote_accelerator.device_count() == genie.device_count() >= 1
    assert torch.remote_accelerator.is_available()
    with pytest.raises(IndexError, match=r"remote_accelerator:99 is not configured"):
        torch.zeros(2, device="remote_accelerator:99")
    with pytest.raises(IndexError, match="not configured"):
        torch.ones(2).to("remote_accelerator:99")
    with pytest.raises(IndexError):
        with genie.capture(99):
            pass


def test_more_devices_when_configured():
    genie.configure(device_count=2)
    try:
        x = torch.ones(3, device="remote_accelerator:1")
        assert x.device.index == 1
        assert torch.equal((x * 2).cpu(), torch.full((3,), 2.0))
    finally:
        genie.configure(device_count=1)


def test_capture_makes_factories_lazy():
    with genie.capture() as dev:
        x = torch.randn(3, 3)
        y = torch.zeros(3)
    assert dev == torch.device(REMOTE)
    assert x.device.type == y.device.type == "remote_accelerator"
    z = torch.zeros(3)
    assert z.device.type == "cpu"


def test_generated_methods_and_storage():
    x = torch.ones(2, device=REMOTE)
    assert x.untyped_storage().device.type == "remote_accelerator"
    assert torch.ones(2).remote_accelerator().device.type == "remote_accelerator"


def test_module_to_keeps_tied_parameters_tied():
    from fakes import gpt2

    model = gpt2().to(REMOTE)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.gpu
def test_pin_memory_still_pins_for_the_local_gpu():
    """With remote_accelerator registered, PyTorch asks it about pinned memory; it must not
    turn pin_memory() into plain host memory on a machine with a GPU."""
    t = torch.ones(1 << 20).pin_memory()
    assert t.is_pinned()
    assert not torch.ones(4).is_pinned()
