"""Small models shared by the tests: real model code (HF transformers from tiny configs with
random weights, and hand-written CNN / DLRM / VQA models); nothing is downloaded."""

from __future__ import annotations

import torch
from torch import nn

REMOTE = "remote_accelerator:0"


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def gpt2(
    n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab: int = 500, positions: int = 128
):
    from transformers import GPT2Config, GPT2LMHeadModel

    seeded()
    cfg = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=positions
    )
    return GPT2LMHeadModel(cfg).eval()


def bert(layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 500):
    from transformers import BertConfig, BertModel

    seeded()
    cfg = BertConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        vocab_size=vocab,
        max_position_embeddings=128,
    )
    return BertModel(cfg).eval()


def vit(layers: int = 2, hidden: int = 64, heads: int = 4, image: int = 32, patch: int = 8):
    from transformers import ViTConfig, ViTModel

    seeded()
    cfg = ViTConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        image_size=image,
        patch_size=patch,
    )
    return ViTModel(cfg).eval()


def clip(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    image: int = 32,
    patch: int = 8,
    vocab: int = 500,
):
    from transformers import CLIPConfig, CLIPModel

    seeded()
    text = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        vocab_size=vocab,
        max_position_embeddings=32,
    )
    vision = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        image_size=image,
        patch_size=patch,
    )
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    return CLIPModel(cfg).eval()


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs with batch norm and an identity/projection skip."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet-style CNN (torchvision is not installable here)."""

    def __init__(self, widths=(16, 32, 64), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet() -> ResNet:
    seeded()
    m = ResNet().eval()
    # Non-trivial running statistics, so eval-mode batch norm does real work.
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m


class DLRM(nn.Module):
    """DLRM-style recommender: dense MLP, sparse features through EmbeddingBags, pairwise
    dot-product interaction, top MLP."""

    def __init__(self, dense: int = 13, tables=(100, 50, 80), dim: int = 16):
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(dense, 32), nn.ReLU(), nn.Linear(32, dim), nn.ReLU())
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum") for n in tables)
        n = len(tables) + 1
        self.top = nn.Sequential(nn.Linear(dim + n * (n - 1) // 2, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, dense, indices, offsets):
        x = self.bottom(dense)
        feats = [x] + [emb(indices[i], offsets[i]) for i, emb in enumerate(self.embeddings)]
        z = torch.stack(feats, dim=1)
        inter = torch.bmm(z, z.transpose(1, 2))
        li, lj = torch.triu_indices(z.shape[1], z.shape[1], offset=1)
        flat = inter[:, li, lj]
        return torch.sigmoid(self.top(torch.cat([x, flat], dim=1)))


def dlrm() -> DLRM:
    seeded()
    return DLRM().eval()


def dlrm_inputs(batch: int = 4, tables=(100, 50, 80), per_bag: int = 3):
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(batch, 13, generator=g)
    indices = [torch.randint(0, n, (batch * per_bag,), generator=g) for n in tables]
    offsets = [torch.arange(0, batch * per_bag, per_bag) for _ in tables]
    return dense, indices, offsets


def to_remote(x):
    """Moves tensors (nested in lists/tuples/dicts) to the remote device."""
    if isinstance(x, torch.Tensor):
        return x.to(REMOTE)
    if isinstance(x, (list, tuple)):
        return type(x)(to_remote(v) for v in x)
    if isinstance(x, dict):
        return {k: to_remote(v) for k, v in x.items()}
    return x


def to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(to_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    return x
