"""Norm rule of `FusedLinearCrossEntropy`: a linear head fused with its cross-entropy.

The layer's input is the hidden states X [B, T, d] and its output the per-sample losses ℓ [B], so the output
gradient g [B] is ∂(Σ_b ℓ_b)/∂ℓ_b (ones in a norm pass). Its per-sample gradients are g_b·G_bᵀX_b for the weight
and g_b·Σ_t G_b[t] for the bias, with G_b the logits' gradient (`flashnorm.layers.linear_cross_entropy`), which
the rule forms a vocabulary block at a time from the call's record (targets, token weights, log-sum-exps) kept
beside the captured X:

* ``exact`` (its one method): ‖g_b G_bᵀX_b‖² + ‖g_b Σ_t G_b[t]‖² summed over the blocks. The same tiles give X̄,
  which the norm pass hands to the layer's backward (one pass over the vocabulary for both);
* the clipped gradient Σ_b c_b g_b G_bᵀX_b block by block (one-pass ``flash_fuse``); the two-pass modes' second
  backward runs the layer's own backward with ∂/∂ℓ_b = c_b·g_b;
* the tied embedding's cross term (`flashnorm.norms.tied`): Σ_s ⟨(G_bᵀX_b)[ids_bs], ē_bs⟩ from the blocks'
  per-sample products, gathered at the sample's ids.

Every pass regenerates the very same G (one tiling per call), so what is measured is what is applied; the rounding
allowance models the float32 sums of the products, s_b = |g_b|·Σ_t ‖G_t‖·(‖x_t‖ + 1) over n = T terms, with the
rows' norms ‖G_t‖ of the G formed, which the norm pass measures (else the bound ‖G_t‖ ≤ 2α_t: a softmax minus a
smoothed one-hot).
"""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch

from ..kernels.accumulation import accumulation_dtype
from ..kernels.backend import cdiv
from ..layers.linear_cross_entropy import FusedLinearCrossEntropy, HeadCall, tile_pass
from . import rounding
from .registry import NormRule, register_norm_rule


@register_norm_rule(FusedLinearCrossEntropy)
class FusedLinearCrossEntropyRule(NormRule):
    methods = ("exact",)
    #: The forward pre-hook casts the hidden states to autocast's dtype: the X kept is the X the head computed with.
    autocast_input = True
    #: The forward hook hands over the call: the layer's record of it (targets, token weights, lse).
    needs_call = True

    def __init__(self):
        #: The record of each captured call, keyed by the id of its captured input (held weakly).
        self.calls = {}

    def remember_call(self, x, args, kwargs, first_use, layer=None):
        call = layer.take_call() if layer is not None else None
        if call is None:
            raise RuntimeError(f"{type(layer).__name__} ran without recording its call: call the module itself.")
        self.calls = {k: v for k, v in self.calls.items() if v[0]() is not None}
        self.calls[id(x)] = (weakref.ref(x), call)

    def _call(self, x: torch.Tensor) -> HeadCall:
        found = self.calls.get(id(x))
        if found is None or found[0]() is not x:
            raise RuntimeError(
                "FusedLinearCrossEntropy: no record of the call whose input this is (the layer must be called in "
                "the wrapped model's training forward, outside activation checkpointing)."
            )
        return found[1]

    @staticmethod
    def _operands(layer: FusedLinearCrossEntropy, x: torch.Tensor, call: HeadCall):
        """(X [B, T, d], W, b) in the call's compute dtype, as the forward pass had them (the same casts)."""
        x = x.unsqueeze(1) if x.dim() == 2 else x
        bias = layer.bias.detach().to(call.dtype) if layer.bias is not None else None
        return x.to(call.dtype), layer.weight.detach().to(call.dtype), bias

    @staticmethod
    def _trainable(layer: FusedLinearCrossEntropy):
        return layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad

    def norm_sq(self, layer, x, g, method, vectors=True, *, backend=None):
        if method != "exact":
            return super().norm_sq(layer, x, g, method, vectors, backend=backend)
        call = self._call(x)
        weight, bias = self._trainable(layer)
        out = tile_pass(*self._operands(layer, x, call), call, g, input_grad=call.input_requires_grad,
                        weight_norm=weight, bias_norm=bias, row_norms=True)
        call.row_norm_sq = out.row_norm_sq
        if call.input_requires_grad:  # the layer's backward, next in this pass, returns it
            call.keep_input_grad(g, out.input_grad)
        if out.norm_sq is None:
            return torch.zeros(x.shape[0], dtype=accumulation_dtype(x, g), device=x.device)
        return out.norm_sq

    def per_sample_grads(self, layer, x, g, out=None, *, backend=None):
        call = self._call(x)
        weight, bias = self._trainable(layer)
        found = tile_pass(*self._operands(layer, x, call), call, g, per_sample=True).per_sample
        grads = {}
        if weight:
            grads[layer.weight] = found["weight"]
        if bias:
            grads[layer.bias] = found["bias"]
        return grads

    def clipped_grads(self, layer, x, g, coef, vectors=True, *, backend=None):
        call = self._call(x)
        weight, bias = self._trainable(layer)
        acc = accumulation_dtype(g, coef)
        out = tile_pass(*self._operands(layer, x, call), call, coef.to(acc) * g.to(acc), weight_grad=weight,
                        bias_grad=bias, weight_dtype=layer.weight.dtype,
                        bias_dtype=layer.bias.dtype if layer.bias is not None else None)
        grads = {}
        if weight:
            grads[layer.weight] = out.weight_grad
        if bias:
            grads[layer.bias] = out.bias_grad
        return grads

    def embedding_cross(self, layer, x, g, ids: torch.Tensor, e: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """⟨∇_W ℓ_b of this head, ∇_W ℓ_b of a tied embedding⟩ per sample → [B], for the embedding's ids [B, T'] and
        the gradient e [B, T', d] its looked-up rows got (accumulation dtype; rows at its ``padding_idx`` zeroed).
        With it, the scale of its dot products' rounding, Σ_s ‖∇_W ℓ_b[ids_bs]‖·‖e_bs‖ [B]."""
        call = self._call(x)
        tiles = tile_pass(*self._operands(layer, x, call), call, g, embedding=(ids, e))
        return tiles.cross, tiles.cross_magnitude

    def vocab_blocks(self, layer, x) -> int:
        """How many vocabulary blocks the call whose input is ``x`` sums over."""
        return cdiv(layer.weight.shape[0], self._call(x).tiling.vocab_block)

    def rounding_scale(self, layer, x, g):
        """s_b = |g_b|·Σ_t ‖G_t‖·(‖x_t‖·[W trainable] + [b trainable]), n = T (see the module docstring); ‖G_t‖
        as measured (its float32 sum of V squares, raised by γ_V), else its bound 2α_t."""
        call = self._call(x)
        x3 = x.unsqueeze(1) if x.dim() == 2 else x
        batch, steps = x3.shape[:2]
        acc = accumulation_dtype(x3, g)
        if call.row_norm_sq is not None:
            row = call.row_norm_sq.to(acc).sqrt().mul_(1 + rounding.gamma(layer.weight.shape[0], 1, acc))
        else:
            row = 2 * call.alpha.to(acc)
        weight, bias = self._trainable(layer)
        per_row = torch.zeros(batch, steps, dtype=acc, device=x.device)
        if weight:
            per_row = per_row + torch.linalg.vector_norm(x3, dim=-1, dtype=acc)
        if bias:
            per_row = per_row + 1
        return g.to(acc).abs() * (row.view(batch, steps) * per_row).sum(dim=1), steps

    def per_sample_dtype(self, layer, x_dtype, g_dtype) -> Optional[torch.dtype]:
        return None  # kept on their own (B·V·d: never packed)
