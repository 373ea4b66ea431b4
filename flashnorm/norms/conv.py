"""Norm rule of the convolution family: ``nn.Conv1d`` and ``nn.Conv2d`` (groups = 1).

A convolution is a Linear layer on unfolded patches (Opacus's strided ``unfold2d``):
X = unfold(x): [B, L, C_in·k], G: [B, L, C_out]
with L the number of output positions, so the Linear rule applies (flash, Gram or per-sample
norms; clipped gradient (c ⊙ G)ᵀX reshaped to the kernel). Grouped convolutions and non-zero
padding modes fall back to per-sample gradients.
"""

from __future__ import annotations

import math

import torch.nn as nn
from opacus.utils.tensor_utils import unfold2d

from .linear import LinearFamilyRule
from .registry import register_norm_rule
from .rounding import frobenius_per_sample


@register_norm_rule([nn.Conv1d, nn.Conv2d])
class ConvRule(LinearFamilyRule):
    """Conv1d / Conv2d via unfold: weight [C_out, C_in, *k] ↔ [p = C_out, d = C_in·Πk]."""

    #: ``forward`` calls ``_conv_forward`` (where weight standardisation and the like are written).
    call_path = ("forward", "_conv_forward")

    def supports(self, layer):
        if layer.groups != 1:
            return "grouped convolution (groups != 1)"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}"
        return None

    def join_uses(self, layer, xs, gs):
        return None  # the uses' patches differ in layout; their per-sample gradients are summed instead

    def group_key(self, layer):
        """The patches' geometry too: convolutions of one input and output shape may unfold differently."""
        return (*super().group_key(layer), layer.kernel_size, layer.stride, layer.padding, layer.dilation)

    def as_sequences(self, layer, x, g):
        if isinstance(layer, nn.Conv1d):  # a 2-D convolution of height 1
            x = x.unsqueeze(-2)
            padding = layer.padding if isinstance(layer.padding, str) else (0, layer.padding[0])
            kernel, stride, dilation = (1, *layer.kernel_size), (1, *layer.stride), (1, *layer.dilation)
        else:
            padding, kernel, stride, dilation = layer.padding, layer.kernel_size, layer.stride, layer.dilation
        gs = self.output_sequences(layer, g)
        if x.shape[0] == 0:  # (Opacus's unfold2d reshapes with -1, ambiguous for an empty batch)
            return x.new_empty(0, gs.shape[1], layer.in_channels * math.prod(kernel)), gs
        patches = unfold2d(x, kernel_size=kernel, padding=padding, stride=stride, dilation=dilation)  # [B, d, L]
        return patches.transpose(1, 2), gs

    def sizes(self, layer, x, g):
        """(B, L, C_in·Πk, C_out) from the shapes alone (no unfold)."""
        return x.shape[0], math.prod(g.shape[2:]), layer.in_channels * math.prod(layer.kernel_size), g.shape[1]

    def input_norm(self, layer, x):
        """‖unfold(x_b)‖_F ≤ √(Πk)·‖x_b‖_F (an input element lies in at most Πk patches), without the unfold."""
        return math.sqrt(math.prod(layer.kernel_size)) * frobenius_per_sample(x)

    def output_sequences(self, layer, g):
        return g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:])).transpose(1, 2)

    def weight_from_pd(self, layer, grad_pd):
        return grad_pd.reshape(*grad_pd.shape[:-2], *layer.weight.shape)
