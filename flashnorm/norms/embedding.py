"""Norm rule of ``nn.Embedding``.

Sample b looks up rows ids_b[t] and receives output gradients G_b[t] ∈ ℝ^D. Its weight gradient
has one non-zero row per distinct id v: Σ_{t: ids_b[t] = v} G_b[t]. So

    ‖∇ℓ_b‖² = Σ_v ‖Σ_{t: ids_b[t]=v} G_b[t]‖²

computed by summing G rows per distinct (sample, id) key (a sort and an ``index_add`` over B·T
rows; no B×V×D or B×T×T tensor, no host synchronisation). Rows at ``padding_idx`` get no gradient, as in ``nn.Embedding``.
The clipped gradient is the embedding backward of c ⊙ G. Sparse embeddings and
``scale_grad_by_freq`` fall back to per-sample gradients.

Gemma's ``GemmaTextScaledWordEmbedding`` (a lookup times a constant ``embed_scale``, and its copies, recognised by
their code) takes the same rule on the lookup's gradient G·scale (:meth:`EmbeddingRule.lookup_grad`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..kernels.accumulation import accumulation_dtype
from .registry import NormRule, copies_of, register_norm_rule, register_norm_rule_matching
from .rounding import frobenius_per_sample


@register_norm_rule(nn.Embedding)
class EmbeddingRule(NormRule):
    methods = ("exact",)

    def supports(self, layer):
        if layer.sparse:
            return "sparse=True"
        if layer.scale_grad_by_freq:
            return "scale_grad_by_freq=True"
        return None

    def lookup_grad(self, layer: nn.Embedding, g: torch.Tensor) -> torch.Tensor:
        """The gradient of the looked-up rows, from the gradient g of the layer's output (the same here)."""
        return g

    def _rows(self, layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor):
        """Flattened (sample index, id, gradient row); rows at ``padding_idx`` are zeroed (no host sync)."""
        batch = ids.shape[0]
        ids = ids.reshape(batch, math.prod(ids.shape[1:]))  # (not -1: ambiguous for an empty batch)
        rows = self.lookup_grad(layer, g).reshape(batch, ids.shape[1], g.shape[-1])
        sample = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
        ids, rows, sample = ids.reshape(-1), rows.reshape(-1, rows.shape[-1]), sample.reshape(-1)
        if layer.padding_idx is not None:
            rows = rows * (ids != layer.padding_idx).unsqueeze(1).to(rows.dtype)
        return sample, ids, rows

    def join_uses(self, layer, xs, gs):
        """All uses' ids and output-gradient rows of a sample, side by side."""
        return (torch.cat([x.reshape(x.shape[0], -1) for x in xs], dim=1),
                torch.cat([g.reshape(g.shape[0], -1, g.shape[-1]) for g in gs], dim=1))

    def norm_sq(self, layer, x, g, method, vectors=True, *, backend=None):
        if method == "per_sample":
            return super().norm_sq(layer, x, g, method, backend=backend)
        batch = x.shape[0]
        acc = accumulation_dtype(g)
        sample, ids, rows = self._rows(layer, x, g)
        # Group equal (sample, id) keys without torch.unique (which syncs with the host): sort the
        # keys, number the runs of equal keys, and sum each run's rows into its slot.
        keys = sample * layer.num_embeddings + ids
        sorted_keys, order = torch.sort(keys)
        new_run = torch.ones_like(sorted_keys, dtype=torch.long)
        new_run[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
        run_sorted = torch.cumsum(new_run, 0) - 1
        run = torch.empty_like(run_sorted).scatter_(0, order, run_sorted)
        summed = torch.zeros(keys.shape[0], rows.shape[1], dtype=acc, device=g.device)
        summed.index_add_(0, run, rows.to(acc))
        run_sample = torch.zeros_like(run).scatter_(0, run, sample)
        norm_sq = torch.zeros(batch, dtype=acc, device=g.device)
        return norm_sq.index_add_(0, run_sample, summed.square().sum(dim=1))

    def rounding_scale(self, layer, x, g):
        """Row v of W_b sums the G_b[t] with ids_b[t] = v: s_b = √T·‖G_b‖_F ≥ Σ_t ‖G_b[t]‖, n = T."""
        steps = math.prod(x.shape[1:])
        return math.sqrt(steps) * frobenius_per_sample(self.lookup_grad(layer, g)), steps

    def clipped_grads(self, layer, x, g, coef, vectors=True, *, backend=None):
        sample, ids, rows = self._rows(layer, x, g)
        weight_grad = torch.zeros_like(layer.weight)
        scaled = rows * coef.to(torch.promote_types(rows.dtype, torch.float32))[sample].unsqueeze(1)  # c unrounded
        return {layer.weight: weight_grad.index_add_(0, ids, scaled.to(weight_grad.dtype))}

    def per_sample_dtype(self, layer, x_dtype, g_dtype):
        return layer.weight.dtype

    def per_sample_grads(self, layer, x, g, out=None, *, backend=None):
        sample, ids, rows = self._rows(layer, x, g)
        slot = (out or {}).get(layer.weight)
        if slot is not None:
            grads = slot.zero_()
        else:
            grads = torch.zeros(x.shape[0], *layer.weight.shape, dtype=layer.weight.dtype, device=g.device)
        grads.index_put_((sample, ids), rows.to(grads.dtype), accumulate=True)
        return {layer.weight: grads}


@register_norm_rule_matching(
    copies_of("transformers.models.gemma.modeling_gemma", "GemmaTextScaledWordEmbedding", base=nn.Embedding)
)
class ScaledEmbeddingRule(EmbeddingRule):
    """Gemma's embedding: y = lookup(ids) · s, s the constant buffer ``embed_scale`` cast to the weight's dtype, so
    the lookup's gradient is g · s, formed as autograd forms it."""

    def lookup_grad(self, layer, g):
        return g * layer.embed_scale.to(layer.weight.dtype)
