"""Models the semantic-layer tests need beyond tests/fakes.py, written from nn modules: a
VQA-style multimodal model (CNN image encoder, transformer question encoder, cross-attention
fusion) and a plain MLP."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, d = x.shape
        m = context.shape[1]
        h = self.heads
        q = self.q_proj(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.k_proj(context).view(b, m, h, d // h).transpose(1, 2)
        v = self.v_proj(context).view(b, m, h, d // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class TextEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.mlp(x))


class VisionEncoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, dim, 3, 2, 1)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, images):
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.relu(self.bn2(self.conv2(x)))
        return x.flatten(2).transpose(1, 2)  # [B, HW, dim] region features


class TextEncoder(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int = 1):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(TextEncoderLayer(dim, heads) for _ in range(layers))

    def forward(self, ids):
        x = self.token_embedding(ids)
        for layer in self.layers:
            x = layer(x)
        return x


class CrossAttentionFusion(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.cross_attn = Attention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, text, vision):
        return self.norm(text + self.cross_attn(text, vision))


class TinyVQA(nn.Module):
    """Visual question answering: a CNN over the image, a transformer over the question,
    question tokens attending to image regions, an answer classifier."""

    def __init__(self, vocab: int = 300, dim: int = 32, heads: int = 4, answers: int = 20):
        super().__init__()
        self.vision_encoder = VisionEncoder(dim)
        self.text_encoder = TextEncoder(vocab, dim, heads)
        self.fusion = CrossAttentionFusion(dim, heads)
        self.answer_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, answers))

    def forward(self, images, question_ids):
        regions = self.vision_encoder(images)
        words = self.text_encoder(question_ids)
        fused = self.fusion(words, regions)
        return self.answer_head(fused.mean(dim=1))


class PlainMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
        )

    def forward(self, x):
        return self.layers(x)


def vqa() -> TinyVQA:
    torch.manual_seed(0)
    return TinyVQA().eval()


def mlp() -> PlainMLP:
    torch.manual_seed(0)
    return PlainMLP().eval()


# -- recommenders and plain models of the semantic zoo ---------------------------------------
# Module names are deliberately plain ("towers", "deep", "cross"): the analyzer must tell a
# recommender by what it computes on (several id tables, dense features), not by names.


class TwoTower(nn.Module):
    """Retrieval: a user tower over user id + dense features, an item tower over item and
    category ids, a dot product between them."""

    def __init__(
        self, users: int = 200, items: int = 300, cats: int = 20, dense: int = 8, dim: int = 16
    ):
        super().__init__()
        self.user_ids = nn.Embedding(users, dim)
        self.user_net = nn.Sequential(nn.Linear(dim + dense, 32), nn.ReLU(), nn.Linear(32, dim))
        self.item_ids = nn.Embedding(items, dim)
        self.item_cats = nn.Embedding(cats, dim)
        self.item_net = nn.Sequential(nn.Linear(2 * dim, 32), nn.ReLU(), nn.Linear(32, dim))

    def forward(self, user, user_feats, item, cat):
        u = self.user_net(torch.cat([self.user_ids(user), user_feats], dim=1))
        v = self.item_net(torch.cat([self.item_ids(item), self.item_cats(cat)], dim=1))
        return (F.normalize(u, dim=-1) * F.normalize(v, dim=-1)).sum(-1)


class WideAndDeep(nn.Module):
    """A wide linear model over sparse crossed ids (an EmbeddingBag of width 1) plus a deep
    MLP over per-field embeddings and dense features."""

    def __init__(self, fields=(50, 40, 30), crosses: int = 500, dense: int = 6, dim: int = 8):
        super().__init__()
        self.wide = nn.EmbeddingBag(crosses, 1, mode="sum")
        self.fields = nn.ModuleList(nn.Embedding(n, dim) for n in fields)
        self.deep = nn.Sequential(
            nn.Linear(len(fields) * dim + dense, 32),
            nn.ReLU(),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, 1),
        )

    def forward(self, cross_ids, cross_offsets, field_ids, dense):
        wide = self.wide(cross_ids, cross_offsets)
        embs = [emb(field_ids[:, i]) for i, emb in enumerate(self.fields)]
        deep = self.deep(torch.cat(embs + [dense], dim=1))
        return torch.sigmoid(wide + deep)


class CrossLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Linear(dim, dim)

    def forward(self, x0, x):
        return x0 * self.w(x) + x


class DCN(nn.Module):
    """Deep & Cross: embeddings of categorical fields and dense features concatenated, an
    explicit cross network and an MLP side by side, one output layer."""

    def __init__(self, fields=(60, 30, 90, 10), dense: int = 5, dim: int = 8, cross: int = 2):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in fields)
        width = len(fields) * dim + dense
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(cross))
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.out = nn.Linear(width + 16, 1)

    def forward(self, ids, dense):
        x0 = torch.cat([t(ids[:, i]) for i, t in enumerate(self.tables)] + [dense], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return torch.sigmoid(self.out(torch.cat([x, self.mlp(x0)], dim=1)))


class DeepFM(nn.Module):
    """A factorisation machine plus an MLP over categorical fields, all in one shared table
    indexed with per-field offsets; first-order weights in a second table."""

    def __init__(self, fields=(10, 20, 30, 40), dim: int = 8):
        super().__init__()
        starts = torch.tensor((0, *fields[:-1])).cumsum(0)
        self.register_buffer("offsets", starts, persistent=False)
        self.embed = nn.Embedding(sum(fields), dim)
        self.first_order = nn.Embedding(sum(fields), 1)
        self.mlp = nn.Sequential(nn.Linear(len(fields) * dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        x = x + self.offsets
        e = self.embed(x)
        fm = 0.5 * (e.sum(1) ** 2 - (e**2).sum(1)).sum(1, keepdim=True)
        return torch.sigmoid(self.first_order(x).sum(1) + fm + self.mlp(e.flatten(1)))


class BehaviourAttention(nn.Module):
    """A deep-interest-style ranker: the user's history of item ids attended with the
    candidate item (a small MLP scores each past item), then an MLP."""

    def __init__(self, items: int = 100, dim: int = 8):
        super().__init__()
        self.items = nn.Embedding(items, dim)
        self.score = nn.Sequential(nn.Linear(4 * dim, 16), nn.ReLU(), nn.Linear(16, 1))
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, history, item):
        h = self.items(history)
        t = self.items(item).unsqueeze(1).expand_as(h)
        w = torch.softmax(self.score(torch.cat([h, t, h - t, h * t], -1)).squeeze(-1), -1)
        return torch.sigmoid(self.mlp(torch.cat([(w.unsqueeze(-1) * h).sum(1), t[:, 0]], -1)))


class PlainCNN(nn.Module):
    """A small convolutional image classifier without residual connections."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * 8 * 8, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class DeepMLP(nn.Module):
    """A regression MLP over dense features: nothing in it says which workload it is."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(12, width),
            nn.Tanh(),
            nn.LayerNorm(width),
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Linear(width, 1),
        )

    def forward(self, x):
        return self.net(x)


class MessagePassing(nn.Module):
    """A graph network: node features transformed, gathered along edges, summed into the
    destination nodes (index_add), transformed again. None of the named workloads."""

    def __init__(self, features: int = 8, hidden: int = 16, out: int = 4):
        super().__init__()
        self.lin1 = nn.Linear(features, hidden)
        self.lin2 = nn.Linear(hidden, out)

    def forward(self, x, src, dst):
        h = self.lin1(x).relu()
        return self.lin2(torch.zeros_like(h).index_add(0, dst, h[src]))


class SeriesTransformer(nn.Module):
    """A transformer encoder over a multivariate float time series: attention, but over no
    tokens and no pixels."""

    def __init__(self, channels: int = 3, dim: int = 16):
        super().__init__()
        self.inp = nn.Linear(channels, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        return self.out(self.encoder(self.inp(x)))


def recsys_and_plain() -> list[tuple[str, str, object]]:
    """(name, expected workload, build) of the zoo's models written here; build returns
    (model, args, kwargs)."""
    import fakes

    g = torch.Generator().manual_seed(3)

    def ints(n, *shape):
        return torch.randint(0, n, shape, generator=g)

    def seeded(cls, *a, **kw):
        torch.manual_seed(0)
        return cls(*a, **kw).eval()

    def dlrm():
        return fakes.dlrm(), fakes.dlrm_inputs(), {}

    def two_tower():
        return (
            seeded(TwoTower),
            (ints(200, 4), torch.randn(4, 8, generator=g), ints(300, 4), ints(20, 4)),
            {},
        )

    def wide_deep():
        ids = torch.stack([ints(50, 4), ints(40, 4), ints(30, 4)], 1)
        return (
            seeded(WideAndDeep),
            (ints(500, 12), torch.arange(0, 12, 3), ids, torch.randn(4, 6, generator=g)),
            {},
        )

    def deepfm():
        ids = torch.stack([ints(n, 4) for n in (10, 20, 30, 40)], 1)
        return seeded(DeepFM), (ids,), {}

    def behaviour():
        return seeded(BehaviourAttention), (ints(100, 4, 6), ints(100, 4)), {}

    def dcn():
        ids = torch.stack([ints(n, 4) for n in (60, 30, 90, 10)], 1)
        return seeded(DCN), (ids, torch.randn(4, 5, generator=g)), {}

    return [
        ("DLRM", "recsys", dlrm),
        ("TwoTower", "recsys", two_tower),
        ("WideAndDeep", "recsys", wide_deep),
        ("DCN", "recsys", dcn),
        ("DeepFM", "recsys", deepfm),
        ("BehaviourAttention", "recsys", behaviour),
        (
            "PlainCNN",
            "vision",
            lambda: (seeded(PlainCNN), (torch.randn(2, 3, 32, 32, generator=g),), {}),
        ),
        (
            "ResNetStyle",
            "vision",
            lambda: (fakes.resnet(), (torch.randn(2, 3, 32, 32, generator=g),), {}),
        ),
        ("PlainMLP", "unknown", lambda: (mlp(), (torch.randn(4, 20, generator=g),), {})),
        ("DeepMLP", "unknown", lambda: (seeded(DeepMLP), (torch.randn(4, 12, generator=g),), {})),
        (
            "MessagePassing",
            "unknown",
            lambda: (
                seeded(MessagePassing),
                (torch.randn(10, 8, generator=g), ints(10, 20), ints(10, 20)),
                {},
            ),
        ),
        (
            "SeriesTransformer",
            "unknown",
            lambda: (seeded(SeriesTransformer), (torch.randn(2, 12, 3, generator=g),), {}),
        ),
    ]
