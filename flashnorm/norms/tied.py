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

Each cross term comes with a bound ε_b on its own rounding (`CrossTerm`), which the clipping coefficient's
allowance takes in (`flashnorm.norms.rounding`). The bounds rest on one inequality: with Ê_b[v] = Σ_{s: ids_bs = v}
‖e_s‖ (the embedding's row norms gathered by token),

    Σ_{t,s} |G_b[t, ids_b[s]]|·‖x_t‖‖e_s‖ = Σ_t ‖x_t‖ Σ_v |G_b[t, v]|·Ê_b[v] ≤ ‖Ê_b‖·Σ_t ‖G_b[t]‖‖x_t‖,

so the sum of the products' magnitudes is at most ‖Ê_b‖·s_b^head, about ‖∇^A‖·‖∇^B‖·√T on ordinary inputs, never the
T-fold larger s^A·s^B. The unfused form sums T·T' products at once and runs in float64 (a float32 sum of that many
would round by far more than the allowance from T ≈ 50: the cost of the float64 GEMM is that of a float32 one
without tensor cores); the fused form sums T products per row of G_bᵀX_b, then T'·d, and stays in float32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ..kernels.accumulation import accumulation_dtype, rows_per_chunk
from . import rounding
from .embedding import EmbeddingBagRule, EmbeddingRule
from .linear import LinearRule
from .linear_cross_entropy import FusedLinearCrossEntropyRule
from .registry import NormRule


class CrossTerm(NamedTuple):
    """A cross term ⟨∇_θ^A ℓ_b, ∇_θ^B ℓ_b⟩ per sample [B] and a bound on its rounding error ε_b [B] (both in the
    accumulation dtype of the layers' captures)."""

    value: torch.Tensor
    error: torch.Tensor


def token_norms(ids: torch.Tensor, e: torch.Tensor, vocab: int) -> torch.Tensor:
    """‖Ê_b‖ [B] with Ê_b[v] = Σ_{s: ids_bs = v} ‖e_bs‖, for ids [B, T'] and e [B, T', d] (accumulation dtype)."""
    batch = ids.shape[0]
    rows = torch.linalg.vector_norm(e, dim=-1)  # [B, T']
    flat = (ids + vocab * torch.arange(batch, device=ids.device).unsqueeze(1)).flatten()
    gathered = torch.zeros(batch * vocab, dtype=rows.dtype, device=rows.device).index_add_(0, flat, rows.flatten())
    return torch.linalg.vector_norm(gathered.view(batch, vocab), dim=1)


def _looked_up(embedding: nn.Embedding, ids, e, dtype):
    """(ids [B, T'], Ē [B, T', d] in ``dtype``), rows at the embedding's ``padding_idx`` zeroed (they get no
    gradient)."""
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    e = e.reshape(batch, ids.shape[1], -1).to(dtype)
    if embedding.padding_idx is not None:
        e = e * (ids != embedding.padding_idx).unsqueeze(-1).to(dtype)
    return ids, e


def _embedding_head_cross(embedding: nn.Embedding, ids, e, head_rule: LinearRule, head: nn.Linear, x, g) -> CrossTerm:
    """The cross term of an embedding and the Linear head it is tied to, accumulated in float64 (see the module
    docstring), returned in the captures' accumulation dtype: ε_b = γ_{d + T·T'}(float64)·‖Ê_b‖·Σ_t ‖G_t‖‖x_t‖ for
    the sums, plus u·|value| for the cast."""
    xs, gs = head_rule.as_sequences(head, x, g)  # [B, T, d], [B, T, V]
    acc = accumulation_dtype(xs, gs, e)
    ids, e = _looked_up(embedding, ids, e, torch.float64)
    batch, (seq_len, width), tokens = ids.shape[0], xs.shape[1:], ids.shape[1]
    out = torch.zeros(batch, dtype=torch.float64, device=gs.device)
    # chunks of n samples × r rows, n·r·T' elements at most (whole samples, several at once, where they fit)
    rows = min(seq_len, rows_per_chunk(tokens))
    samples = rows_per_chunk(seq_len * tokens) if rows == seq_len else 1
    for b0 in range(0, batch, samples):
        e_n, ids_n = e[b0:b0 + samples], ids[b0:b0 + samples]  # [n, T', d], [n, T']
        for t0 in range(0, seq_len, rows):
            x_blk = xs[b0:b0 + samples, t0:t0 + rows].double()  # [n, r, d]
            g_blk = gs[b0:b0 + samples, t0:t0 + rows]
            picked = g_blk.gather(2, ids_n.unsqueeze(1).expand(-1, g_blk.shape[1], -1)).double()  # G_b[t, ids_b[s]]
            out[b0:b0 + samples] += torch.bmm(x_blk, e_n.transpose(1, 2)).mul_(picked).sum(dim=(1, 2))
    head_scale = (torch.linalg.vector_norm(xs, dim=-1, dtype=acc)  # (a scale: float32 sums suffice)
                  * torch.linalg.vector_norm(gs, dim=-1, dtype=acc)).sum(dim=1).double()
    sums = rounding.gamma(width + seq_len * tokens, 1, torch.float64) * token_norms(ids, e, embedding.num_embeddings)
    value = out.to(acc)
    return CrossTerm(value, (sums * head_scale).to(acc) + rounding.unit_roundoff(acc) * value.abs())


def cross_term(
    rule_a: NormRule, layer_a: nn.Module, x_a, g_a, rule_b: NormRule, layer_b: nn.Module, x_b, g_b,
    param: nn.Parameter, backend: Optional[str] = None,
) -> CrossTerm:
    """⟨∇_θ^A ℓ_b, ∇_θ^B ℓ_b⟩ per sample → `CrossTerm` [B] (float32, float64 for float64 inputs)."""
    for (ra, la, xa, ga), (rb, lb, xb, gb) in (
        ((rule_a, layer_a, x_a, g_a), (rule_b, layer_b, x_b, g_b)),
        ((rule_b, layer_b, x_b, g_b), (rule_a, layer_a, x_a, g_a)),
    ):
        if isinstance(ra, EmbeddingRule) and type(rb) is LinearRule and la.weight is param and lb.weight is param:
            return _embedding_head_cross(la, xa, ra.lookup_grad(la, ga), rb, lb, xb, gb)
        if isinstance(ra, EmbeddingRule) and not isinstance(ra, EmbeddingBagRule) \
                and isinstance(rb, FusedLinearCrossEntropyRule) and la.weight is param and lb.weight is param:
            return _fused_head_cross(ra, la, xa, ga, rb, lb, xb, gb)
    return per_sample_cross(rule_a.per_sample_grads(layer_a, x_a, g_a, backend=backend)[param],
                            rule_b.per_sample_grads(layer_b, x_b, g_b, backend=backend)[param])


def _fused_head_cross(embedding_rule: EmbeddingRule, embedding: nn.Embedding, ids, g_embedding,
                      head_rule: FusedLinearCrossEntropyRule, head: nn.Module, x, g) -> CrossTerm:
    """The cross term of an embedding and the fused head it is tied to (`FusedLinearCrossEntropyRule.embedding_cross`:
    rows of G_bᵀX_b, T products each, then their dot products with Ē over the vocabulary's blocks):
    ε_b = γ_T·‖Ê_b‖·s_b^head + γ_{d + T' + blocks}·Σ_s ‖row_s‖‖ē_s‖, with the head's rounding scale
    s_b^head ≥ |g_b|·Σ_t ‖G_t‖‖x_t‖."""
    e = embedding_rule.lookup_grad(embedding, g_embedding)
    acc = accumulation_dtype(x, e, g)
    ids, e = _looked_up(embedding, ids, e, acc)
    value, magnitude = head_rule.embedding_cross(head, x, g, ids, e)
    head_scale, steps = head_rule.rounding_scale(head, x, g)
    rows = rounding.gamma(steps, 1, acc) * token_norms(ids, e, embedding.num_embeddings) * head_scale.to(acc)
    dots = rounding.gamma(e.shape[-1] + ids.shape[1] + head_rule.vocab_blocks(head, x), 1, acc) * magnitude
    return CrossTerm(value, rows + dots)


def per_sample_cross(grad_a: torch.Tensor, grad_b: torch.Tensor) -> CrossTerm:
    """⟨grad_a[b], grad_b[b]⟩ of per-sample gradients [B, ...] → `CrossTerm` (ε_b = γ_{|θ|}·‖grad_a[b]‖‖grad_b[b]‖,
    the rounding of the dot product alone)."""
    value = per_sample_dot(grad_a, grad_b)
    gamma = rounding.gamma(grad_a[0].numel(), 1, value.dtype)
    norms = [torch.linalg.vector_norm(gs.flatten(1), dim=1, dtype=value.dtype) for gs in (grad_a, grad_b)]
    return CrossTerm(value, gamma * norms[0] * norms[1])


def per_sample_dot(grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """⟨grad_a[b], grad_b[b]⟩ for per-sample gradients [B, ...] → [B] (float32, float64 for float64)."""
    acc = accumulation_dtype(grad_a, grad_b)
    return (grad_a.flatten(1).to(acc) * grad_b.flatten(1).to(acc)).sum(dim=1)
