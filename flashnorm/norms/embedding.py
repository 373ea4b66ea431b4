"""Norm rule of ``nn.Embedding``.

Sample b looks up rows ids_b[t] and receives output gradients G_b[t] ∈ ℝ^D. Its weight gradient
has one non-zero row per distinct id v: Σ_{t: ids_b[t] = v} G_b[t]. So

    ‖∇ℓ_b‖² = Σ_v ‖Σ_{t: ids_b[t]=v} G_b[t]‖²

computed by summing G rows per distinct (sample, id) key (a sort and an ``index_add`` over B·T
rows; no B×V×D or B×T×T tensor, no host synchronisation). Rows at ``padding_idx`` get no gradient, as in ``nn.Embedding``.
The clipped gradient is the embedding backward of c ⊙ G. Sparse embeddings fall back to per-sample gradients.
The rule does not serve ``scale_grad_by_freq`` either: that gradient divides by each id's frequency in the whole
batch, and a model with such a trainable embedding is refused (`flashnorm.grad_sample.independence`).

Gemma's ``GemmaTextScaledWordEmbedding`` (a lookup times a constant ``embed_scale``, and its copies, recognised by
their code) takes the same rule on the lookup's gradient G·scale (`EmbeddingRule.lookup_grad`).
"""

from __future__ import annotations

import math
import weakref

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


@register_norm_rule(nn.EmbeddingBag)
class EmbeddingBagRule(EmbeddingRule):
    """``nn.EmbeddingBag`` on a 2-D input [B, L]: bag b is sample b, its output gradient g_b ∈ ℝ^D.

    * ``sum``: position t of bag b sends w_bt·g_b to row ids_b[t] (w = ``per_sample_weights``, else 1);
    * ``mean``: g_b / n_b to each row (n_b the bag's ids other than ``padding_idx``);
    * ``max``: g_b[d] to row m_b[d] for each dimension d, m the forward's arg-max ids (recomputed by
      ``torch.embedding_bag`` on the same weight and ids), so ‖∇ℓ_b‖² = Σ_{d: bag non-empty} g_b[d]².

    Positions at ``padding_idx`` get no gradient. ``per_sample_weights`` reaches the rule through the captured call
    (`needs_call`). A 1-D input with ``offsets`` (bags not one per sample) is refused when it runs
    (`flashnorm.grad_sample.independence`), sparse gradients fall back to per-sample gradients.
    """

    #: The forward hook hands over the call (``per_sample_weights``).
    needs_call = True

    def __init__(self):
        #: ``per_sample_weights`` of each captured call, keyed by the id of its captured input (held weakly).
        self.calls = {}

    def supports(self, layer):
        return "sparse=True" if layer.sparse else None

    def remember_call(self, x, args, kwargs, first_use, layer=None):
        offsets = args[0] if args else kwargs.get("offsets")
        if offsets is not None or x.dim() != 2:
            raise NotImplementedError(
                f"nn.EmbeddingBag with a {x.dim()}-D input and offsets: FlashNorm needs one bag per sample, a 2-D "
                "input [B, L] (pad the bags with padding_idx)."
            )
        weights = args[1] if len(args) > 1 else kwargs.get("per_sample_weights")
        self.calls = {k: v for k, v in self.calls.items() if v[0]() is not None}
        self.calls[id(x)] = (weakref.ref(x), None if weights is None else weights.detach())

    def _weights(self, x):
        found = self.calls.get(id(x))
        return found[1] if found is not None and found[0]() is x else None

    def join_uses(self, layer, xs, gs):
        return None  # bags of two uses are not one bag: their per-sample gradients are summed

    def _position_weights(self, layer, x, g) -> torch.Tensor:
        """The factor of g_b each position t sends to row ids_b[t]: [B, L] in g's accumulation dtype."""
        acc = accumulation_dtype(g)
        weights = self._weights(x)
        w = torch.ones(x.shape, dtype=acc, device=g.device) if weights is None else weights.to(acc)
        if layer.padding_idx is not None:
            kept = (x != layer.padding_idx).to(acc)
            w = w * kept
        else:
            kept = torch.ones_like(w)
        if layer.mode == "mean":
            w = w / kept.sum(dim=1, keepdim=True).clamp(min=1)
        return w

    def _max_ids(self, layer, x):
        """m [B, D]: the id each output dimension's maximum came from, as the forward found it; -1 for an empty bag
        (all ``padding_idx``), whose output is zero and sends no gradient."""
        batch, steps = x.shape
        offsets = torch.arange(batch, device=x.device) * steps
        _, _, bag_size, ids = torch.embedding_bag(  # (as F.embedding_bag calls it)
            layer.weight.detach(), x.reshape(-1), offsets, False, 2, False, None, False, layer.padding_idx
        )
        return ids.masked_fill((bag_size == 0).unsqueeze(1), -1)

    def _rows(self, layer, x, g):
        if layer.mode == "max":
            ids = self._max_ids(layer, x)  # [B, D]: dimension d of sample b's gradient row lands in row ids[b, d]
            batch, dim = ids.shape
            sample = torch.arange(batch, device=x.device).unsqueeze(1).expand_as(ids).reshape(-1)
            rows = torch.diag_embed(g).reshape(batch * dim, dim)  # (b, d) → g_b[d]·e_d
            valid = (ids >= 0).reshape(-1)
            rows = rows * valid.unsqueeze(1).to(rows.dtype)
            return sample, ids.reshape(-1).clamp(min=0), rows
        batch, steps = x.shape
        w = self._position_weights(layer, x, g)
        rows = g.unsqueeze(1).to(w.dtype) * w.unsqueeze(2)
        sample = torch.arange(batch, device=x.device).unsqueeze(1).expand(batch, steps).reshape(-1)
        return sample, x.reshape(-1), rows.reshape(batch * steps, g.shape[-1])

    def norm_sq(self, layer, x, g, method, vectors=True, *, backend=None):
        if method == "exact" and layer.mode == "max":
            valid = (self._max_ids(layer, x) >= 0).to(accumulation_dtype(g))
            return (g.to(valid.dtype).square() * valid).sum(dim=1)
        return super().norm_sq(layer, x, g, method, vectors, backend=backend)

    def rounding_scale(self, layer, x, g):
        """Row v of W_b sums w_bt·g_b over the positions with ids_b[t] = v: s_b = Σ_t |w_bt|·‖g_b‖, n = L."""
        if layer.mode == "max":
            return frobenius_per_sample(g), 1
        w = self._position_weights(layer, x, g)
        return w.abs().sum(dim=1) * frobenius_per_sample(g), max(x.shape[1], 1)
