"""Real models captured on remote_accelerator give the bits eager CPU gives, on every executor:
the embedded one, a loopback server over TCP and over DPDK, and two devices at once
(tests/executors.py)."""

from __future__ import annotations

import pytest
import torch
from fakes import REMOTE, bert, clip, dlrm, dlrm_inputs, gpt2, resnet, to_cpu, to_remote, vit

import genie

pytest_plugins = ["executors"]


def _ids(batch=2, seq=12, vocab=500, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_gpt2_forward_bit_exact(executor):
    model = gpt2()
    ids = _ids()
    ref = model(ids).logits
    rmodel = model.to(REMOTE)
    out = rmodel(ids.to(REMOTE)).logits
    assert out.device.type == "remote_accelerator"
    assert genie.stats()["pending_nodes"] > 0, "nothing should run before the value is needed"
    assert torch.equal(out.cpu(), ref)


@torch.no_grad()
def test_gpt2_with_attention_mask(executor):
    model = gpt2()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on the first row
    ref = model(ids, attention_mask=mask).logits
    out = model.to(REMOTE)(ids.to(REMOTE), attention_mask=mask.to(REMOTE)).logits
    assert torch.equal(out.cpu(), ref)


@torch.no_grad()
def test_gpt2_kv_cache_steps(executor):
    model = gpt2()
    ids = _ids(seq=8)
    ref = model(ids, use_cache=True)
    nxt = ref.logits[:, -1:].argmax(-1)
    ref2 = model(nxt, past_key_values=ref.past_key_values, use_cache=True).logits

    rmodel = model.to(REMOTE)
    out = rmodel(ids.to(REMOTE), use_cache=True)
    rnxt = out.logits[:, -1:].argmax(-1)
    out2 = rmodel(rnxt, past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.equal(rnxt.cpu(), nxt)
    assert torch.equal(out2.cpu(), ref2)


@torch.no_grad()
def test_gpt2_greedy_generation_8_tokens(executor):
    model = gpt2()
    ids = _ids(batch=2, seq=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    rmodel = model.to(REMOTE)
    rids = ids.to(REMOTE)
    out = rmodel.generate(rids, attention_mask=torch.ones_like(rids), **kwargs)
    assert out.shape == (2, 14)
    assert torch.equal(out.cpu(), ref)


@torch.no_grad()
def test_bert_bit_exact(executor):
    model = bert()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ref = model(ids, attention_mask=mask)
    out = model.to(REMOTE)(ids.to(REMOTE), attention_mask=mask.to(REMOTE))
    assert torch.equal(out.last_hidden_state.cpu(), ref.last_hidden_state)
    assert torch.equal(out.pooler_output.cpu(), ref.pooler_output)


@torch.no_grad()
def test_vit_bit_exact(executor):
    model = vit()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = model(px).last_hidden_state
    out = model.to(REMOTE)(px.to(REMOTE)).last_hidden_state
    assert torch.equal(out.cpu(), ref)


@torch.no_grad()
def test_clip_vision_text_bit_exact(executor):
    model = clip()
    ids = _ids(seq=10)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref = model(input_ids=ids, pixel_values=px)
    out = model.to(REMOTE)(input_ids=ids.to(REMOTE), pixel_values=px.to(REMOTE))
    assert torch.equal(out.logits_per_image.cpu(), ref.logits_per_image)
    assert torch.equal(out.text_embeds.cpu(), ref.text_embeds)


@torch.no_grad()
def test_resnet_cnn_bit_exact(executor):
    model = resnet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ref = model(x)
    out = model.to(REMOTE)(x.to(REMOTE))
    assert torch.equal(out.cpu(), ref)


@torch.no_grad()
def test_dlrm_embedding_bag_mlp_bit_exact(executor):
    model = dlrm()
    inputs = dlrm_inputs()
    ref = model(*inputs)
    out = model.to(REMOTE)(*to_remote(inputs))
    assert torch.equal(out.cpu(), ref)


@torch.no_grad()
def test_capture_context_mixes_cpu_model_and_lazy_inputs(executor):
    """Inside genie.capture(), tensors made without a device are lazy and CPU parameters that
    meet them become graph inputs rather than device-mismatch errors."""
    model = resnet()
    x_ref = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = model(x_ref)
    with genie.capture():
        x = torch.empty(2, 3, 32, 32)
        assert x.device.type == "remote_accelerator"
        x.copy_(x_ref)
        out = model(x)  # model weights stay on the CPU
    assert out.device.type == "remote_accelerator"
    assert torch.equal(out.cpu(), ref)


@torch.no_grad()
def test_capture_context_cpu_index_tensor_becomes_input(executor):
    table = torch.randn(50, 8)
    idx = torch.tensor([3, 1, 4, 1, 5])
    with genie.capture():
        w = torch.zeros(50, 8)
        w += table
        rows = w[idx]  # CPU index into a lazy tensor
    assert torch.equal(rows.cpu(), table[idx])


@pytest.mark.parametrize("make", [gpt2, bert])
@torch.no_grad()
def test_outputs_stay_lazy_until_needed(executor, make):
    model = make().to(REMOTE)
    before = genie.stats()["nodes_executed"]
    out = model(_ids().to(REMOTE))
    first = (
        out[0]
        if isinstance(out, tuple)
        else (out.logits if hasattr(out, "logits") else out.last_hidden_state)
    )
    assert genie.stats()["nodes_executed"] == before
    to_cpu(first)
    assert genie.stats()["nodes_executed"] > before


@pytest.mark.parametrize("model_type", ["glm4_moe", "mixtral"])
@torch.no_grad()
def test_moe_lm_forward_bit_exact(executor, model_type):
    """Mixture-of-experts LMs, their experts as HF runs them on a device that is not the CPU
    (grouped matmuls over an integer histogram of expert ids: Note: [Integer histograms on a
    CPU target]), record with no flush and equal eager."""
    from genie.semantic import hf_models as hf

    mapping = hf.mapping("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    if model_type not in mapping:
        pytest.skip(f"this transformers has no {model_type}")
    model, args, kwargs = hf.build_hf(model_type, mapping[model_type], "text")
    ref = model(*args, **kwargs).logits
    genie.synchronize()
    flushes = genie.stats()["flushes"]
    rmodel = model.to(REMOTE)
    out = rmodel(*to_remote(args), **to_remote(kwargs)).logits
    assert genie.stats()["flushes"] == flushes
    assert torch.equal(out.cpu(), ref)
