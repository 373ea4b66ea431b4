"""Norm rule of the convolution family: ``nn.Conv1d`` and ``nn.Conv2d`` (groups = 1).

A convolution is a Linear layer on unfolded patches: X = unfold(x): [B, L, C_in·k], G: [B, L, C_out]
with L the number of output positions, so the Linear rule applies (flash, Gram or per-sample
norms; clipped gradient (c ⊙ G)ᵀX reshaped to the kernel). Grouped convolutions and non-zero
padding modes fall back to per-sample gradients.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import LinearFamilyRule
from .registry import register_norm_rule


def _explicit_padding(layer: nn.Module, kernel: Tuple[int, ...]) -> Tuple[Tuple[int, int], ...]:
    """(left, right) padding per spatial dim, resolving ``"same"`` / ``"valid"``."""
    if layer.padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if layer.padding == "same":
        pads = []
        for k, dil in zip(kernel, layer.dilation):
            total = dil * (k - 1)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return tuple((pad, pad) for pad in layer.padding)


@register_norm_rule([nn.Conv1d, nn.Conv2d])
class ConvRule(LinearFamilyRule):
    """Conv1d / Conv2d via unfold: weight [C_out, C_in, *k] ↔ [p = C_out, d = C_in·Πk]."""

    def supports(self, layer):
        if layer.groups != 1:
            return "grouped convolution (groups != 1)"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}"
        return None

    def as_sequences(self, layer, x, g):
        batch = x.shape[0]
        if isinstance(layer, nn.Conv1d):  # treat as a 2-D convolution of height 1
            x, g = x.unsqueeze(-2), g.unsqueeze(-2)
            kernel, stride, dilation = (1, *layer.kernel_size), (1, *layer.stride), (1, *layer.dilation)
            pads = ((0, 0), *_explicit_padding(layer, layer.kernel_size))
        else:
            kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
            pads = _explicit_padding(layer, layer.kernel_size)
        flat_pad = [side for pair in reversed(pads) for side in pair]  # F.pad: last dim first
        if any(flat_pad):
            x = F.pad(x, flat_pad)
        patches = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)  # [B, C_in·Πk, L]
        return patches.transpose(1, 2), g.reshape(batch, g.shape[1], -1).transpose(1, 2)

    def weight_from_pd(self, layer, grad_pd):
        return grad_pd.reshape(*grad_pd.shape[:-2], *layer.weight.shape)
