"""Cross terms of a parameter used by two layers (tied weights).

When layers A and B both use θ, sample b's gradient is ∇_θ^A + ∇_θ^B and

    ‖∇_θ^A + ∇_θ^B‖² = ‖∇_θ^A‖² + ‖∇_θ^B‖² + 2⟨∇_θ^A, ∇_θ^B⟩,

so the layers' own norms (their rules, unchanged) need the cross term ⟨∇_θ^A, ∇_θ^B⟩ per sample. A tied
embedding and LM head (``wte`` / ``lm_head``) is the usual case: with the head's X: [B, T, d], G: [B, T, V] and
the embedding's ids: [B, T'] and output gradient E: [B, T', d],

    ⟨G_bᵀX_b, onehot(ids_b)ᵀE_b⟩ = Σ_{t,s} G_b[t, ids_b[s]] · (x_t · e_s),

which needs a gather of G's columns at the sample's ids and X_bE_bᵀ, never a V × d tensor per sample. A fused head
(`FusedLinearCrossEntropy`, whose G is never stored) forms the same sum block by block of the vocabulary, from the
rows of G_bᵀX_b at the ids (`FusedLinearCrossEntropyRule.embedding_cross`). Other pairs take the per-sample
gradients of both layers (exact, B·|θ| memory each).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..kernels.accumulation import accumulation_dtype, rows_per_chunk
from .embedding import EmbeddingBagRule, EmbeddingRule
from .linear import LinearRule
from .linear_cross_entropy import FusedLinearCrossEntropyRule
from .registry import NormRule


def _embedding_head_cross(embedding: nn.Embedding, ids, e, head_rule: LinearRule, head: nn.Linear, x, g) -> torch.Tensor:
    xs, gs = head_rule.as_sequences(head, x, g)  # [B, T, d], [B, T, V]
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    e = e.reshape(batch, ids.shape[1], -1)
    if embedding.padding_idx is not None:  # the padding row gets no gradient
        e = e * (ids != embedding.padding_idx).unsqueeze(-1).to(e.dtype)
    acc = accumulation_dtype(xs, gs, e)
    out = torch.zeros(batch, dtype=acc, device=gs.device)
    seq_len, tokens = xs.shape[1], ids.shape[1]
    rows = min(seq_len, rows_per_chunk(tokens))
    for b in range(batch):
        e_b, ids_b = e[b].to(acc), ids[b]
        for t0 in range(0, seq_len, rows):
            x_blk = xs[b, t0:t0 + rows].to(acc)  # [r, d]
            picked = gs[b, t0:t0 + rows].index_select(1, ids_b).to(acc)  # G_b[t, ids_b[s]]: [r, T']
            out[b] += (x_blk @ e_b.T).mul_(picked).sum()
    return out


def cross_term(
    rule_a: NormRule, layer_a: nn.Module, x_a, g_a, rule_b: NormRule, layer_b: nn.Module, x_b, g_b,
    param: nn.Parameter, backend: Optional[str] = None,
) -> torch.Tensor:
    """⟨∇_θ^A ℓ_b, ∇_θ^B ℓ_b⟩ per sample → [B] (float32, float64 for float64 inputs)."""
    for (ra, la, xa, ga), (rb, lb, xb, gb) in (
        ((rule_a, layer_a, x_a, g_a), (rule_b, layer_b, x_b, g_b)),
        ((rule_b, layer_b, x_b, g_b), (rule_a, layer_a, x_a, g_a)),
    ):
        if isinstance(ra, EmbeddingRule) and type(rb) is LinearRule and la.weight is param and lb.weight is param:
            return _embedding_head_cross(la, xa, ra.lookup_grad(la, ga), rb, lb, xb, gb)
        if isinstance(ra, EmbeddingRule) and not isinstance(ra, EmbeddingBagRule) \
                and isinstance(rb, FusedLinearCrossEntropyRule) and la.weight is param and lb.weight is param:
            return rb.embedding_cross(lb, xb, gb, la, xa, ra.lookup_grad(la, ga))
    return per_sample_dot(rule_a.per_sample_grads(layer_a, x_a, g_a, backend=backend)[param],
                          rule_b.per_sample_grads(layer_b, x_b, g_b, backend=backend)[param])


def per_sample_dot(grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """⟨grad_a[b], grad_b[b]⟩ for per-sample gradients [B, ...] → [B] (float32, float64 for float64)."""
    acc = accumulation_dtype(grad_a, grad_b)
    return (grad_a.flatten(1).to(acc) * grad_b.flatten(1).to(acc)).sum(dim=1)
