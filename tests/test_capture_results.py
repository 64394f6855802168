"""Results the executor's kernels make that capture did not foresee (Note: [Checked results]),
and ops PyTorch chooses by device type (Note: [Ops chosen by device type]); each compared with
eager CPU or with the error a user would read."""

from __future__ import annotations

import copy

import pytest
import torch
from fakes import REMOTE
from torch import nn

import genie


def _batch_norm_args(dev):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 4), torch.randn(3), torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    return [t.to(dev) for t in (x, w, b, rm, rv)]


@pytest.fixture(params=["compiled", "python"])
def executor(request):
    """The compiled embedded executor and the Python replay engine every Python executor uses."""
    if request.param == "python":
        from genie.runtime.executor import PythonExecutor, install_executor, use_local

        install_executor(PythonExecutor("cpu"))
        yield request.param
        use_local()
    else:
        yield request.param


@pytest.mark.parametrize(
    "call",
    [
        lambda x, w, b, rm, rv: torch.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5),
        lambda x, w, b, rm, rv: torch.ops.aten._native_batch_norm_legit(
            x, w, b, rm, rv, False, 0.1, 1e-5
        ),
    ],
    ids=["native_batch_norm", "_native_batch_norm_legit"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batch_norm_eval_results_match_eager(call, dtype, executor):
    """Eval-mode batch norm on the CPU returns empty saved statistics (in the input's dtype)
    where its meta kernel promised float32 ones per channel: reading them used to segfault the
    process in `.cpu()`. Every result now has eager's dtype, shape and values."""
    ref = call(*(t.to(dtype) for t in _batch_norm_args("cpu")))
    out = call(*(t.to(dtype) for t in _batch_norm_args(REMOTE)))
    for a, b in zip(ref, out, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(b.cpu(), a)


def test_a_result_meta_did_not_foresee_raises_naming_the_op(executor):
    """_embedding_bag's CPU kernel returns an empty offset2bag where meta sizes it by index (a
    view past the end of a 0-byte storage, before): reading it raises an error naming the op
    and both geometries, and the op's other results stay readable and equal eager."""
    w, idx, off = torch.randn(10, 4), torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4])
    ref = torch.ops.aten._embedding_bag(w, idx, off, False, 0)
    out = torch.ops.aten._embedding_bag(w.to(REMOTE), idx.to(REMOTE), off.to(REMOTE), False, 0)
    with pytest.raises(
        genie.ExecutionError, match=r"_embedding_bag.*returned i64\[0\].*recorded i64\[8\]"
    ):
        out[1].cpu()
    assert torch.equal(out[0].cpu(), ref[0])
    assert torch.equal((out[0] * 2).cpu(), ref[0] * 2)  # later work carries on


def test_batch_norm_module_in_eval_mode_with_trainable_parameters(executor):
    """An eval-mode BatchNorm whose parameters require grad keeps the saved statistics alive
    for autograd; its forward still equals eager."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    out = copy.deepcopy(m).to(REMOTE)(x.to(REMOTE))
    assert torch.equal(out.cpu(), ref)


def _flat(o):
    if isinstance(o, torch.Tensor):
        return [o]
    return [t for v in o for t in _flat(v)]


RNNS = [
    ("GRUCell", lambda: nn.GRUCell(5, 7), (3, 5)),
    ("LSTMCell", lambda: nn.LSTMCell(5, 7), (3, 5)),
    ("GRU", lambda: nn.GRU(5, 7, num_layers=2), (4, 3, 5)),
    ("LSTM", lambda: nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True), (3, 4, 5)),
    ("LSTM-proj", lambda: nn.LSTM(5, 7, proj_size=3), (4, 3, 5)),
]


@pytest.mark.parametrize("name,make,shape", RNNS, ids=[r[0] for r in RNNS])
def test_recurrent_modules_match_eager(name, make, shape, executor):
    """nn.GRU/LSTM/GRUCell/LSTMCell pick CUDA-only fused cells for any non-CPU tensor; on
    remote_accelerator they run on every executor, forward and backward equal to eager CPU
    (bitwise for the cells; the full CPU layers run oneDNN, so within float32 rounding)."""
    torch.manual_seed(0)
    m = make()
    x = torch.randn(*shape)
    ref = m(x)
    rm = copy.deepcopy(m).to(REMOTE)
    out = rm(x.to(REMOTE))
    got = [t.cpu() for t in _flat(out)]
    for a, b in zip(_flat(ref), got, strict=True):
        if name.endswith("Cell"):
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a)
    _flat(ref)[0].sum().backward()
    _flat(out)[0].sum().backward()
    for p, q in zip(m.parameters(), rm.parameters(), strict=True):
        torch.testing.assert_close(q.grad.cpu(), p.grad)


def test_recurrent_module_in_inference_mode():
    """Inference mode skips autograd, where the decomposition is registered first."""
    torch.manual_seed(0)
    m = nn.GRU(5, 7)
    x = torch.randn(4, 3, 5)
    with torch.inference_mode():
        ref = m(x)
        out = copy.deepcopy(m).to(REMOTE)(x.to(REMOTE))
        for a, b in zip(_flat(ref), _flat(out), strict=True):
            torch.testing.assert_close(b.cpu(), a)


def test_device_chosen_ops_are_found_by_rule():
    """The decomposed set is every known decomposition the CPU has no kernel for, not a list."""
    ops = genie.decompositions.decomposed_ops()
    assert {"aten::_thnn_fused_gru_cell", "aten::_thnn_fused_lstm_cell"} <= set(ops)
    for name in ops:
        assert not torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, "CPU")


def test_eval_batch_norm_backward_reads_the_kernels_own_statistics(executor):
    """Backward of eval-mode batch norm reads the saved statistics the CPU kernel made (empty),
    not the per-channel ones meta inference promised: gradients equal eager."""

    def grads(dev):
        x, w, b, rm, rv = (t.requires_grad_(i < 3) for i, t in enumerate(_batch_norm_args(dev)))
        y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=False)
        return [g.cpu() for g in torch.autograd.grad(y.sin().sum(), [x, w, b])]

    for a, b in zip(grads("cpu"), grads(REMOTE), strict=True):
        assert torch.equal(a, b)


def test_embedding_bag_backward_matches_eager(executor):
    """embedding_bag's CPU kernel returns an empty offset2bag where meta sizes it by index;
    the backward that reads it still equals eager (the DLRM training step)."""

    def grads(dev):
        torch.manual_seed(0)
        bag = nn.EmbeddingBag(10, 4, mode="sum").to(dev)
        idx = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]).to(dev)
        offsets = torch.tensor([0, 4]).to(dev)
        bag(idx, offsets).pow(2).sum().backward()
        return bag.weight.grad.cpu()

    assert torch.equal(grads("cpu"), grads(REMOTE))


def test_zero_gradient_is_real_zeros(executor):
    """Autograd's efficient zero tensors (sgn's gradient) have no memory behind them: they
    arrive as zeros instead of a read through a null pointer."""
    x = torch.randn(5, 5).to(REMOTE).requires_grad_()
    (g,) = torch.autograd.grad(torch.sgn(x), [x], torch.ones(5, 5).to(REMOTE))
    assert torch.equal(g.cpu(), torch.zeros(5, 5))


def test_conjugate_views_match_eager(executor):
    """x.conj(), .mH and the fft ops that conjugate internally equal eager (the conjugate bit
    used to be dropped: fft.ifft/hfft2/hfftn/ihfft differed)."""
    torch.manual_seed(0)
    z = torch.randn(4, 6, dtype=torch.complex64)
    r = torch.randn(4, 6)
    cases = [
        lambda t, u: t.conj(),
        lambda t, u: t.mH @ t,
        lambda t, u: torch._neg_view(t) + 1,
        lambda t, u: torch.fft.ifft(u),
        lambda t, u: torch.fft.hfft2(t),
        lambda t, u: torch.fft.hfftn(t),
        lambda t, u: torch.fft.ihfft(u),
    ]
    for f in cases:
        assert torch.equal(f(z.to(REMOTE), r.to(REMOTE)).cpu(), f(z, r))


def test_tensor_split_with_device_indices_is_refused_as_on_cuda():
    """Eager CUDA refuses device-resident split indices; so does remote_accelerator, in the
    same words."""
    x = torch.arange(10.0).to(REMOTE)
    idx = torch.tensor([2, 5]).to(REMOTE)
    with pytest.raises(
        RuntimeError, match="tensor_split expected tensor_indices_or_sections to be on cpu"
    ):
        torch.tensor_split(x, idx)
    parts = torch.tensor_split(x, torch.tensor([2, 5]))  # host indices work as in eager
    assert [p.cpu().tolist() for p in parts] == [
        list(map(float, r)) for r in (range(2), range(2, 5), range(5, 10))
    ]


def test_multilabel_margin_loss_of_one_sample_matches_eager(executor):
    """PyTorch's meta kernel says [1] for a 1-D input with reduction='none' where every kernel
    returns a 0-dim loss; genie's loss has eager's shape and value."""
    torch.manual_seed(0)
    x, t = torch.randn(4), torch.tensor([3, 0, -1, 1])
    ref = nn.MultiLabelMarginLoss(reduction="none")(x, t)
    out = nn.MultiLabelMarginLoss(reduction="none")(x.to(REMOTE), t.to(REMOTE))
    assert out.shape == ref.shape
    assert torch.equal(out.cpu(), ref)


class _GruVqa(nn.Module):
    """A VQA-style model: a small CNN over the image, a GRU over the question's tokens, fused."""

    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.embed = nn.Embedding(50, 16)
        self.gru = nn.GRU(16, 8, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, image, question):
        v = self.cnn(image).flatten(1)
        _, h = self.gru(self.embed(question))
        return self.head(torch.cat([v, h[-1]], 1))


def test_vqa_model_with_a_gru_question_encoder_matches_eager(executor):
    """The model issue 15 could not run at all: its answer logits equal eager's."""
    torch.manual_seed(0)
    m = _GruVqa().eval()
    image, question = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 7))
    ref = m(image, question)
    out = copy.deepcopy(m).to(REMOTE)(image.to(REMOTE), question.to(REMOTE))
    torch.testing.assert_close(out.cpu(), ref)


def test_sparse_tensors_are_refused_in_genies_words():
    """A sparse tensor moved to the device is refused with genie's error, naming the op."""
    with pytest.raises(genie.UnsupportedOperationError, match="dense strided tensors only"):
        torch.randn(3, 3).to_sparse().to(REMOTE)
