"""The C++ program digest (Note: [Program digests]) agrees with the Python encoding the server
validates: the same binding, one fingerprint per program, a new one when anything encoded
changes."""

from __future__ import annotations

import fakes
import genie
import pytest
import torch
from genie import _C
from genie.runtime.program import encode_program

pytest.importorskip("transformers")

DEVICE = "remote_accelerator:0"


def _flush_digest(fn):
    fn()
    d = _C._digest_nodes()
    assert d is not None
    enc = encode_program(_C._last_flushed_nodes())
    return d, enc


@pytest.mark.parametrize(
    "name, build, make_input",
    [
        ("gpt2", fakes.gpt2, lambda: torch.randint(0, 500, (2, 12))),
        ("bert", fakes.bert, lambda: torch.randint(0, 500, (2, 12))),
        ("resnet", fakes.resnet, lambda: torch.randn(2, 3, 32, 32)),
        ("vit", fakes.vit, lambda: torch.randn(2, 3, 32, 32)),
    ],
)
@torch.no_grad()
def test_digest_binding_matches_encoding_and_fingerprint_is_stable(name, build, make_input):
    model = build().to(DEVICE)
    x = make_input().to(DEVICE)

    def forward():
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.sum().cpu()

    seen = []
    for _ in range(3):
        (fp, prefix, binding), enc = _flush_digest(forward)
        assert binding == enc.binding, f"{name}: the C++ binding differs from the encoding's"
        seen.append((fp, prefix, enc.key))
    # The same code on the same shapes: one program, one fingerprint, one key.
    assert seen[1] == seen[2]
    # Another batch size changes shapes: another fingerprint and another key.
    x = torch.cat([make_input(), make_input()]).to(DEVICE)
    (fp, prefix, _), enc = _flush_digest(forward)
    assert fp != seen[2][0] and enc.key != seen[2][2]
    assert prefix != seen[2][1]  # the first nodes already see the new batch size


@torch.no_grad()
def test_digest_sees_scalar_arguments():
    """Two programs that differ only in a scalar argument have different fingerprints."""
    a = torch.randn(4, 4).to(DEVICE)
    (fp1, _, b1), e1 = _flush_digest(lambda: (a * 2.0).cpu())
    (fp2, _, b2), e2 = _flush_digest(lambda: (a * 3.0).cpu())
    (fp3, _, _), e3 = _flush_digest(lambda: (a * 2.0).cpu())
    assert e1.key != e2.key and fp1 != fp2
    assert fp1 == fp3 and e1.key == e3.key
    assert b1 == e1.binding and b2 == e2.binding


@torch.no_grad()
def test_digest_of_random_program_lists_generator_states():
    genie.synchronize()
    torch.manual_seed(3)
    x = (torch.randn(3, 3, device=DEVICE) + 1).cpu()
    torch.manual_seed(3)
    assert torch.equal(x, torch.randn(3, 3) + 1)
    d = _C._digest_nodes()
    assert d is not None and d[2] == encode_program(_C._last_flushed_nodes()).binding
