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
        self.layers = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                    nn.Linear(64, 5))

    def forward(self, x):
        return self.layers(x)


def vqa() -> TinyVQA:
    torch.manual_seed(0)
    return TinyVQA().eval()


def mlp() -> PlainMLP:
    torch.manual_seed(0)
    return PlainMLP().eval()
