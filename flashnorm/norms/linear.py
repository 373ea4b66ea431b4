"""Norm rule of the Linear family: ``nn.Linear`` and ``transformers``' GPT-2 ``Conv1D``.

x: [B, ..., d], g: [B, ..., p] are flattened to X: [B, T, d], G: [B, T, p] (T = product of
the middle dimensions; T = 1 for 2-D inputs). Per sample, W_b = G_bᵀX_b and β_b = Σ_t G_b[t]:

* ``flash``: ‖W_b‖² tile by tile (`flashnorm.kernels.flash_norm_sq`), 2·B·T·d·p FLOPs;
* ``gram``: ⟨X_bX_bᵀ, G_bG_bᵀ⟩ (`flashnorm.kernels.gram_norm_sq`), ≈ B·T²·(d+p) FLOPs;
  rank-one ‖x_b‖²‖g_b‖² when T = 1; in float64 beyond `GRAM_FLOAT32_MAX_STEPS`
  positions (its float32 rounding grows with T);
* ``per_sample``: W_b materialised (B·d·p memory), then its norm;

plus ‖β_b‖² for the bias. The clipped gradient is (c ⊙ G)ᵀX and Σ_b c_b β_b.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..kernels.accumulation import accumulation_dtype
from ..kernels import (
    clipped_bias_grad,
    clipped_weight_grad,
    clipped_weight_grads_stacked,
    flash_norm_sq,
    gram_norm_sq,
    per_sample_weight_grads,
)
from .registry import NormRule, flatten_to_sequences, register_norm_rule
from .rounding import frobenius_per_sample, gram_in_float64

try:  # transformers is optional: GPT-2's Conv1D gets the rule when it is installed.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - exercised only without transformers
    Conv1D = None


class LinearFamilyRule(NormRule):
    """Shared rule for layers that compute y = x Wᵀ + b on flattened sequences."""

    methods = ("flash", "gram", "per_sample")
    autocast_input = True
    grouped_methods = ("flash", "gram")  # per_sample: B·d·p weights, packed per layer

    # -- layout hooks, overridden per layer type -------------------------------------------------
    def as_sequences(self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """X: [B, T, d], G: [B, T, p]."""
        return flatten_to_sequences(x), self.output_sequences(layer, g)

    def output_sequences(self, layer: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """G: [B, T, p] alone (what the bias needs)."""
        return flatten_to_sequences(g)

    def weight_from_pd(self, layer: nn.Module, grad_pd: torch.Tensor) -> torch.Tensor:
        """Maps a [..., p, d] gradient to the weight's layout."""
        return grad_pd

    # -- rule ------------------------------------------------------------------------------------
    def sizes(self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Tuple[int, int, int, int]:
        """(B, T, d, p) of the flattened problem, for the planner."""
        xs, gs = self.as_sequences(layer, x, g)
        return xs.shape[0], xs.shape[1], xs.shape[2], gs.shape[2]

    def join_uses(self, layer, xs, gs):
        """[X_1; …; X_k], [G_1; …; G_k] along the sequence: Σ_k G_kᵀX_k is one product over the joined rows."""
        return (torch.cat([flatten_to_sequences(x) for x in xs], dim=1),
                torch.cat([flatten_to_sequences(g) for g in gs], dim=1))

    def vector_params(self, layer):
        bias = getattr(layer, "bias", None)
        return [bias] if bias is not None and bias.requires_grad and layer.weight.requires_grad else []

    def vector_grads(self, layer, x, g, out, *, backend=None):
        """β_b = Σ_t G_b[t], summed in float32 (float64) into ``out[bias]``."""
        return {layer.bias: _bias_grads(self.output_sequences(layer, g), out[layer.bias])}

    def norm_sq(self, layer, x, g, method, vectors=True, *, backend=None):
        if method == "per_sample":
            return super().norm_sq(layer, x, g, method, vectors, backend=backend)
        total = None
        for _, term in self._terms(layer, x, g, method, vectors, backend):
            total = term if total is None else total.add_(term)
        return total

    def norm_sq_by_param(self, layer, x, g, method, vectors=True, *, backend=None):
        """{weight: ‖W_b‖², bias: ‖β_b‖²} by ``method``: the two terms `norm_sq` adds."""
        if method == "per_sample":
            return super().norm_sq_by_param(layer, x, g, method, vectors, backend=backend)
        return dict(self._terms(layer, x, g, method, vectors, backend))

    def _terms(self, layer, x, g, method, vectors, backend) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        """(θ, [B]) for the trainable ones of the weight, ‖W_b‖² by ``method`` (flash or Gram), and the bias, ‖β_b‖²
        (unless ``vectors=False`` leaves it to the packed per-sample gradients)."""
        xs, gs = self.as_sequences(layer, x, g)
        terms = []
        weight = layer.weight
        if weight.requires_grad:
            if method == "flash":
                terms.append((weight, flash_norm_sq(xs, gs, backend=backend)))
            elif method == "gram" and gram_in_float64(xs.shape[1], xs.dtype):
                terms.append((weight, gram_norm_sq(xs.double(), gs.double(), backend=backend).to(accumulation_dtype(xs, gs))))
            elif method == "gram":
                terms.append((weight, gram_norm_sq(xs, gs, backend=backend)))
            else:
                raise ValueError(f"unknown norm method {method!r} for {type(layer).__name__}")
        bias = getattr(layer, "bias", None)
        if bias is not None and bias.requires_grad and (vectors or not self.vector_params(layer)):
            # ‖Σ_t G_b[t]‖², summed in the accumulation dtype without a copy of G (three launches per layer)
            terms.append((bias, torch.linalg.vector_norm(gs.sum(dim=1, dtype=accumulation_dtype(xs, gs)), dim=1).square_()))
        return terms

    def rounding_scale(self, layer, x, g):
        """s_b = ‖X_b‖_F‖G_b‖_F for the weight, + √T·‖G_b‖_F for the bias (Σ_t G_b[t]); n = T."""
        steps = self.output_sequences(layer, g).shape[1]
        g_norm = frobenius_per_sample(g)
        scale = self.input_norm(layer, x) * g_norm if layer.weight.requires_grad else torch.zeros_like(g_norm)
        bias = getattr(layer, "bias", None)
        if bias is not None and bias.requires_grad:
            scale = scale + math.sqrt(steps) * g_norm
        return scale, steps

    def input_norm(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """‖X_b‖_F of the flattened input: [B]."""
        return frobenius_per_sample(x)

    def per_sample_weight(self, layer: nn.Module, xs: torch.Tensor, gs: torch.Tensor, out: Optional[torch.Tensor]):
        """W_b in the weight's layout, [B, *weight.shape], written into ``out`` when given."""
        if out is not None:
            per_sample_weight_grads(xs, gs, out=out.view(xs.shape[0], gs.shape[-1], xs.shape[-1]))
            return out
        return self.weight_from_pd(layer, per_sample_weight_grads(xs, gs))

    def per_sample_dtype(self, layer, x_dtype, g_dtype):
        return torch.promote_types(x_dtype, g_dtype)

    def per_sample_grads(self, layer, x, g, out=None, *, backend=None):
        xs, gs = self.as_sequences(layer, x, g)
        out = out or {}
        grads: Dict[nn.Parameter, torch.Tensor] = {}
        if layer.weight.requires_grad:
            # Kept in the compute dtype (bf16 under autocast): B·d·p elements, the largest tensor of the step;
            # the assembled Σ_b c_b W_b is cast to the parameter's dtype once.
            grads[layer.weight] = self.per_sample_weight(layer, xs, gs, out.get(layer.weight))
        bias = getattr(layer, "bias", None)
        if bias is not None and bias.requires_grad:
            grads[bias] = _bias_grads(gs, out.get(bias))
        return grads

    def clipped_grads(self, layer, x, g, coef, vectors=True, *, backend=None):
        xs, gs = self.as_sequences(layer, x, g)
        grads: Dict[nn.Parameter, torch.Tensor] = {}
        if layer.weight.requires_grad:
            grads[layer.weight] = self.weight_from_pd(layer, clipped_weight_grad(xs, gs, coef, backend=backend)).to(layer.weight.dtype)
        bias = getattr(layer, "bias", None)
        if bias is not None and bias.requires_grad and (vectors or not self.vector_params(layer)):
            grads[bias] = clipped_bias_grad(gs, coef).to(bias.dtype)
        return grads

    def clipped_grads_grouped(self, layers, x, g, coef, *, backend=None):
        """One batched GEMM for the L weights, (c ⊙ G_l)ᵀX_l (`clipped_weight_grads_stacked`, float32 however the
        captures are stored: a group's layers are small), and one weighted sum for their biases."""
        first = layers[0]
        xs, gs = self.as_sequences(first, x, g)
        xs, gs = xs.unflatten(0, (len(layers), -1)), gs.unflatten(0, (len(layers), -1))
        grads: Dict[nn.Parameter, torch.Tensor] = {}
        if first.weight.requires_grad:
            weights = self.weight_from_pd(first, clipped_weight_grads_stacked(xs, gs, coef)).to(first.weight.dtype)
            grads.update((layer.weight, w) for layer, w in zip(layers, weights))
        if getattr(first, "bias", None) is not None and first.bias.requires_grad:
            biases = clipped_bias_grad(gs, coef).to(first.bias.dtype)
            grads.update((layer.bias, b) for layer, b in zip(layers, biases))
        return grads


def _bias_grads(gs: torch.Tensor, slot: Optional[torch.Tensor]) -> torch.Tensor:
    """β_b = Σ_t G_b[t] for gs: [B, T, p] → [B, p], summed into ``slot`` (in its dtype) when given."""
    return gs.sum(dim=1) if slot is None else torch.sum(gs, dim=1, dtype=slot.dtype, out=slot)


@register_norm_rule(nn.Linear)
class LinearRule(LinearFamilyRule):
    """``nn.Linear``: weight [p, d]."""


if Conv1D is not None:

    @register_norm_rule(Conv1D)
    class GPT2Conv1DRule(LinearFamilyRule):
        """``transformers`` ``Conv1D`` (GPT-2): y = x W + b with weight [d, p]."""

        def weight_from_pd(self, layer, grad_pd):
            return grad_pd.transpose(-1, -2)

        def per_sample_weight(self, layer, xs, gs, out):
            return per_sample_weight_grads(xs, gs, out=out, transposed=True)  # X_bᵀG_b: [B, d, p], no transpose copy
