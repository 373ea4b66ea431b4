"""Norm rules of the normalisation family: LayerNorm, RMSNorm, GroupNorm.

With x̂ the normalised input (recomputed from x with the layer's own eps) and G the output
gradient, the per-sample gradients are small (B × C), so they are materialised:

    ∇weight_b = Σ_{positions} G_b ⊙ x̂_b,      ∇bias_b = Σ_{positions} G_b

summed over every position that shares a parameter element (sequence positions for
LayerNorm/RMSNorm, spatial positions for GroupNorm's channels). Norm and clipped gradient follow.
A LayerNorm or RMSNorm over its last dimension with a trainable weight goes through
:func:`~flashnorm.kernels.affine_norm.affine_norm_grads` (one kernel on CUDA, its reference elsewhere).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels._chunks import accumulation_dtype, accumulation_dtype_of
from ..kernels.affine_norm import affine_norm_grads
from .registry import NormRule, flatten_to_sequences, register_norm_rule
from .rounding import frobenius_per_sample


class _AffineNormRule(NormRule):
    methods = ("per_sample",)

    def normalized(self, layer, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def reduce_dims(self, layer, x):
        """Dims of x (batch first) summed to bring a per-position term onto the parameter: every dim
        between the batch and the trailing ``normalized_shape`` (LayerNorm, RMSNorm)."""
        return tuple(range(1, x.dim() - len(layer.normalized_shape)))

    def per_sample_dtype(self, layer, x_dtype, g_dtype):
        return accumulation_dtype_of(x_dtype, g_dtype)

    def rounding_scale(self, layer, x, g):
        """x̂ has mean square ≤ 1 per normalised group, so ‖X̂_b‖_F ≤ √(numel x_b): s_b = ‖G_b‖_F·(√numel + √n)
        bounds Σ over the n summed positions of ‖g ⊙ x̂‖ (weight) and ‖g‖ (bias)."""
        positions = math.prod(x.shape[d] for d in self.reduce_dims(layer, x))
        return frobenius_per_sample(g) * (math.sqrt(x[0].numel()) + math.sqrt(positions)), positions

    def join_uses(self, layer, xs, gs):
        """Positions normalised one by one (a 1-D ``normalized_shape``) concatenate along the sequence."""
        if len(getattr(layer, "normalized_shape", ())) != 1:
            return None
        return (torch.cat([flatten_to_sequences(x) for x in xs], dim=1),
                torch.cat([flatten_to_sequences(g) for g in gs], dim=1))

    #: LayerNorm (True: subtract the mean) or RMSNorm (False) over the last dim: the one-launch kernel applies
    #: (:func:`~flashnorm.kernels.affine_norm.affine_norm_grads`); None: the general sums below.
    centered: Optional[bool] = None

    def per_sample_grads(self, layer, x, g, out=None, *, backend=None):
        weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        if self.centered is not None and len(layer.normalized_shape) == 1 and weight is not None and weight.requires_grad:
            out = out or {}
            with_bias = bias is not None and bias.requires_grad
            rows = (flatten_to_sequences(x), flatten_to_sequences(g))
            eps = layer.eps if layer.eps is not None else torch.finfo(accumulation_dtype(x, g)).eps
            w, b = affine_norm_grads(*rows, eps=eps, center=self.centered, with_bias=with_bias,
                                     weight_out=out.get(weight), bias_out=out.get(bias) if with_bias else None,
                                     backend=backend)
            return {weight: w, bias: b} if with_bias else {weight: w}
        acc = accumulation_dtype(x, g)
        x, g = x.to(acc), g.to(acc)
        dims = self.reduce_dims(layer, x)
        out = out or {}
        grads = {}
        if weight is not None and weight.requires_grad:
            grads[weight] = _sum_onto(g * self.normalized(layer, x), dims, weight, out.get(weight))
        if bias is not None and bias.requires_grad:
            grads[bias] = _sum_onto(g, dims, bias, out.get(bias))
        return grads


def _sum_onto(term: torch.Tensor, dims: tuple, param: nn.Parameter, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Σ over ``dims`` of term: [B, ...] → [B, *param.shape], written into ``out`` when given."""
    batch = term.shape[0]
    if out is None:
        return (term.sum(dim=dims) if dims else term).reshape(batch, *param.shape)
    if dims:
        kept = [n for i, n in enumerate(term.shape) if i not in dims]
        torch.sum(term, dim=dims, out=out.view(kept))
    else:
        out.copy_(term.reshape(out.shape))
    return out


@register_norm_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    centered = True

    def normalized(self, layer, x):
        return F.layer_norm(x, layer.normalized_shape, eps=layer.eps)


@register_norm_rule(nn.RMSNorm)
class RMSNormRule(_AffineNormRule):
    centered = False

    def normalized(self, layer, x):
        return F.rms_norm(x, layer.normalized_shape, eps=layer.eps)


@register_norm_rule(nn.GroupNorm)
class GroupNormRule(_AffineNormRule):
    def normalized(self, layer, x):
        return F.group_norm(x, layer.num_groups, eps=layer.eps)

    def reduce_dims(self, layer, x):
        return tuple(range(2, x.dim()))
