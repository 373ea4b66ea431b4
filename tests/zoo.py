"""Small models, one per supported layer type, each ending in a 2-D Linear head and a per-sample loss.

``build(kind, steps)`` → (model, inputs, targets); the sequence (or spatial) length is ``steps``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from opacus.layers import DPMultiheadAttention

BATCH, D_IN, D_HID, CLASSES, VOCAB = 3, 6, 5, 4, 11


class MeanOver(nn.Module):
    """Mean over the given dims (pools a sequence or image to one vector)."""

    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(dim=self.dims)


class Scale(nn.Module):
    """A layer with no FlashNorm rule and no Opacus grad sampler: x ⊙ w + child(x)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.inner = nn.Linear(d, d)

    def forward(self, x):
        return x * self.weight + self.inner(x)


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = DPMultiheadAttention(d, num_heads=2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _head(d):
    return nn.Linear(d, CLASSES)


def build(kind: str, steps: int, batch: int = BATCH):
    b, t = batch, steps
    if kind == "linear2d":
        model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), _head(D_HID))
        x = torch.randn(b, D_IN)
    elif kind == "linear3d":
        model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), MeanOver(1), _head(D_HID))
        x = torch.randn(b, t, D_IN)
    elif kind == "linear4d":
        model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), MeanOver(1, 2), _head(D_HID))
        x = torch.randn(b, 2, t, D_IN)
    elif kind == "linear_nobias":
        model = nn.Sequential(nn.Linear(D_IN, D_HID, bias=False), nn.Tanh(), MeanOver(1), _head(D_HID))
        x = torch.randn(b, t, D_IN)
    elif kind == "embedding":
        model = nn.Sequential(nn.Embedding(VOCAB, D_HID, padding_idx=0), MeanOver(1), _head(D_HID))
        x = torch.randint(0, VOCAB, (b, t))
    elif kind == "layernorm":
        model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.LayerNorm(D_HID), nn.Tanh(), MeanOver(1), _head(D_HID))
        x = torch.randn(b, t, D_IN)
    elif kind == "rmsnorm":
        model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.RMSNorm(D_HID), nn.Tanh(), MeanOver(1), _head(D_HID))
        x = torch.randn(b, t, D_IN)
    elif kind == "groupnorm":
        # 4 channels per group: at T = 1 a 2-element group's normalisation amplifies fp32 rounding
        # (~1e-6 relative) regardless of the DP algorithm; fp64 covers the algebra at 1e-10.
        model = nn.Sequential(nn.Conv1d(D_IN, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Tanh(), MeanOver(2), _head(8))
        x = torch.randn(b, D_IN, t)
    elif kind == "conv1d":
        model = nn.Sequential(nn.Conv1d(D_IN, D_HID, 3, padding="same", dilation=2), nn.Tanh(), MeanOver(2), _head(D_HID))
        x = torch.randn(b, D_IN, t)
    elif kind == "conv2d":
        model = nn.Sequential(nn.Conv2d(3, D_HID, 3, padding=1, stride=(2, 1)), nn.Tanh(), MeanOver(2, 3), _head(D_HID))
        x = torch.randn(b, 3, t, 3)
    elif kind == "hf_conv1d":
        from transformers.pytorch_utils import Conv1D

        model = nn.Sequential(Conv1D(D_HID, D_IN), nn.Tanh(), MeanOver(1), _head(D_HID))
        x = torch.randn(b, t, D_IN)
    elif kind == "dp_mha":
        model = nn.Sequential(nn.Linear(D_IN, 4), Attention(4), MeanOver(1), _head(4))
        x = torch.randn(b, t, D_IN)
    elif kind == "shared_position":
        model = PositionalLM()
        x = torch.randint(0, VOCAB, (b, t))
    elif kind == "fallback":
        model = nn.Sequential(nn.Linear(D_IN, D_HID), Scale(D_HID), nn.Tanh(), MeanOver(1), _head(D_HID))
        x = torch.randn(b, t, D_IN)
    else:
        raise KeyError(kind)
    y = torch.randint(0, CLASSES, (b,))
    return model, x, y


KINDS = (
    "linear2d", "linear3d", "linear4d", "linear_nobias", "embedding", "layernorm", "rmsnorm",
    "groupnorm", "conv1d", "conv2d", "hf_conv1d", "dp_mha", "fallback", "shared_position",
)


class PositionalLM(nn.Module):
    """Token + position embeddings, the position table shared by the batch (input [1, T], broadcast)."""

    def __init__(self, max_steps=700):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D_HID)
        self.wpe = nn.Embedding(max_steps, D_HID)
        self.head = _head(D_HID)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return self.head(torch.tanh(self.wte(ids) + self.wpe(positions)).mean(dim=1))
