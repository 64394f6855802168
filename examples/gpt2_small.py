"""A small GPT-2 with random weights, for `genie analyze examples/gpt2_small.py`."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def build():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    return model, (ids,)
