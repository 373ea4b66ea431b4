"""Small models, one per supported layer type, each ending in a 2-D Linear head and a per-sample loss.

``ZOO`` maps a kind to its `Kind` row; ``build(kind, steps)`` → (model, inputs, targets), the
sequence (or spatial) length being ``steps``. ``KINDS`` is the table's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

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


class HFLogits(nn.Module):
    """A Hugging Face model called on token ids alone, returning its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


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


def _head(d):
    return nn.Linear(d, CLASSES)


def _pooled(*layers, dims=(1,), width=D_HID) -> nn.Sequential:
    """layers → mean over ``dims`` → head (the head is created last, after the layers' weights)."""
    return nn.Sequential(*layers, MeanOver(*dims), _head(width))


def _hf_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D  # imported when used: transformers is slow to import

    return _pooled(Conv1D(D_HID, D_IN), nn.Tanh())


@dataclass(frozen=True)
class Kind:
    """One model of the zoo: ``model()`` is built first (so a seed fixes its weights), then
    ``inputs(batch, steps)`` gives its batch-first input."""

    model: Callable[[], nn.Module]
    inputs: Callable[[int, int], torch.Tensor]


def _features(*shape: int) -> Callable[[int, int], torch.Tensor]:
    """Standard normal input [B, *shape], ``None`` in ``shape`` standing for the length T."""
    return lambda b, t: torch.randn(b, *(t if n is None else n for n in shape))


def _tokens(b: int, t: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t))


T = None  # the sequence (or spatial) length in an input shape

ZOO: Dict[str, Kind] = {
    "linear2d": Kind(lambda: nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), _head(D_HID)), _features(D_IN)),
    "linear3d": Kind(lambda: _pooled(nn.Linear(D_IN, D_HID), nn.Tanh()), _features(T, D_IN)),
    "linear4d": Kind(lambda: _pooled(nn.Linear(D_IN, D_HID), nn.Tanh(), dims=(1, 2)), _features(2, T, D_IN)),
    "linear_nobias": Kind(lambda: _pooled(nn.Linear(D_IN, D_HID, bias=False), nn.Tanh()), _features(T, D_IN)),
    "embedding": Kind(lambda: _pooled(nn.Embedding(VOCAB, D_HID, padding_idx=0)), _tokens),
    "layernorm": Kind(lambda: _pooled(nn.Linear(D_IN, D_HID), nn.LayerNorm(D_HID), nn.Tanh()), _features(T, D_IN)),
    "rmsnorm": Kind(lambda: _pooled(nn.Linear(D_IN, D_HID), nn.RMSNorm(D_HID), nn.Tanh()), _features(T, D_IN)),
    # 4 channels per group: at T = 1 a 2-element group's normalisation amplifies fp32 rounding
    # (~1e-6 relative) regardless of the DP algorithm; fp64 covers the algebra at 1e-10.
    "groupnorm": Kind(
        lambda: _pooled(nn.Conv1d(D_IN, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Tanh(), dims=(2,), width=8),
        _features(D_IN, T),
    ),
    "conv1d": Kind(
        lambda: _pooled(nn.Conv1d(D_IN, D_HID, 3, padding="same", dilation=2), nn.Tanh(), dims=(2,)), _features(D_IN, T)
    ),
    "conv2d": Kind(
        lambda: _pooled(nn.Conv2d(3, D_HID, 3, padding=1, stride=(2, 1)), nn.Tanh(), dims=(2, 3)), _features(3, T, 3)
    ),
    "hf_conv1d": Kind(_hf_conv1d, _features(T, D_IN)),
    "dp_mha": Kind(lambda: _pooled(nn.Linear(D_IN, 4), Attention(4), width=4), _features(T, D_IN)),
    "fallback": Kind(lambda: _pooled(nn.Linear(D_IN, D_HID), Scale(D_HID), nn.Tanh()), _features(T, D_IN)),
    "shared_position": Kind(PositionalLM, _tokens),
}
KINDS = tuple(ZOO)


def build(kind: str, steps: int, batch: int = BATCH):
    """(model, inputs [batch, ...], targets [batch]) of ``kind`` with length ``steps``."""
    if kind not in ZOO:
        raise KeyError(f"unknown zoo kind {kind!r}; one of {', '.join(KINDS)}")
    row = ZOO[kind]
    model = row.model()
    inputs = row.inputs(batch, steps)
    return model, inputs, torch.randint(0, CLASSES, (batch,))
