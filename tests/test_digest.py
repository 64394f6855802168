"""The C++ program digest (Note: [Program digests]) agrees with the Python encoding the server
validates: the same binding, one fingerprint per program, a new one when anything encoded
changes."""

from __future__ import annotations

import fakes
import pytest
import torch

import genie
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
        (fp, prefix, binding, *_), enc = _flush_digest(forward)
        assert binding == enc.binding, f"{name}: the C++ binding differs from the encoding's"
        seen.append((fp, prefix, enc.key))
    # The same code on the same shapes: one program, one fingerprint, one key.
    assert seen[1] == seen[2]
    # Another batch size changes shapes: another fingerprint and another key.
    x = torch.cat([make_input(), make_input()]).to(DEVICE)
    (fp, prefix, *_), enc = _flush_digest(forward)
    assert fp != seen[2][0] and enc.key != seen[2][2]
    assert prefix != seen[2][1]  # the first nodes already see the new batch size


@torch.no_grad()
def test_digest_sees_scalar_arguments():
    """Two programs that differ only in a scalar argument have different fingerprints."""
    a = torch.randn(4, 4).to(DEVICE)
    (fp1, _, b1, *_), e1 = _flush_digest(lambda: (a * 2.0).cpu())
    (fp2, _, b2, *_), e2 = _flush_digest(lambda: (a * 3.0).cpu())
    (fp3, _, _, *_), e3 = _flush_digest(lambda: (a * 2.0).cpu())
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


def _leaf(nodes: list, path: list[int]):
    x = nodes
    for i in path:
        x = x[i]
    return x


@torch.no_grad()
def test_structure_leaves_out_growing_sizes_and_params_point_into_the_encoding():
    """Note: [Program templates]: two decode steps with a growing DynamicCache share a
    structure but not a fingerprint; each parameter's path names a leaf of the encoded
    program holding that value; a float argument stays in the structure."""
    model = fakes.gpt2().to(DEVICE)
    ids = torch.randint(0, 500, (2, 6)).to(DEVICE)
    out = model(ids, use_cache=True)
    pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tok.cpu()
    steps = []
    for _ in range(2):
        out = model(tok, past_key_values=pkv, use_cache=True)
        pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tok.cpu()
        d = _C._digest_nodes()
        assert d is not None
        steps.append((d, encode_program(_C._last_flushed_nodes())))
    (d1, e1), (d2, e2) = steps
    assert d1[0] != d2[0] and e1.key != e2.key  # new shapes: new programs
    assert d1[3] == d2[3] and d1[4] == d2[4]  # one structure, one structural prefix
    for d, enc in steps:
        params, paths = d[5], d[6]
        assert len(params) == len(paths) > 0
        assert all(_leaf(enc.nodes, p) == v for p, v in zip(paths, params, strict=True))
    moved = [p for p, a, b in zip(d1[6], d1[5], d2[5], strict=True) if a != b]
    assert moved, "the cache's growth shows in the parameters"
    a = torch.randn(4, 4).to(DEVICE)
    s1, s2 = (_flush_digest(lambda f=f: (a * f).cpu())[0][3] for f in (2.0, 3.0))
    assert s1 != s2
