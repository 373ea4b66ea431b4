"""Norm rules of the normalisation family: LayerNorm, RMSNorm, GroupNorm.

With x̂ the normalised input (recomputed from x with the layer's own eps) and G the output
gradient, the per-sample gradients are small (B × C), so they are materialised:

    ∇weight_b = Σ_{positions} G_b ⊙ x̂_b,      ∇bias_b = Σ_{positions} G_b

summed over every position that shares a parameter element (sequence positions for
LayerNorm/RMSNorm, spatial positions for GroupNorm's channels). Norm and clipped gradient follow.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..kernels._chunks import accumulation_dtype
from .registry import NormRule, register_norm_rule


class _AffineNormRule(NormRule):
    methods = ("per_sample",)

    def normalized(self, layer, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def reduce_dims(self, layer, x):
        """Dims of x (batch first) summed to bring a per-position term onto the parameter: every dim
        between the batch and the trailing ``normalized_shape`` (LayerNorm, RMSNorm)."""
        return tuple(range(1, x.dim() - len(layer.normalized_shape)))

    def per_sample_grads(self, layer, x, g):
        acc = accumulation_dtype(x, g)
        x, g = x.to(acc), g.to(acc)
        dims = self.reduce_dims(layer, x)
        grads = {}
        weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        if weight is not None and weight.requires_grad:
            term = g * self.normalized(layer, x)
            grads[weight] = (term.sum(dim=dims) if dims else term).reshape(x.shape[0], *weight.shape)
        if bias is not None and bias.requires_grad:
            grads[bias] = (g.sum(dim=dims) if dims else g).reshape(x.shape[0], *bias.shape)
        return grads


@register_norm_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    def normalized(self, layer, x):
        return F.layer_norm(x, layer.normalized_shape, eps=layer.eps)


@register_norm_rule(nn.RMSNorm)
class RMSNormRule(_AffineNormRule):
    def normalized(self, layer, x):
        return F.rms_norm(x, layer.normalized_shape, eps=layer.eps)


@register_norm_rule(nn.GroupNorm)
class GroupNormRule(_AffineNormRule):
    def normalized(self, layer, x):
        return F.group_norm(x, layer.num_groups, eps=layer.eps)

    def reduce_dims(self, layer, x):
        return tuple(range(2, x.dim()))
