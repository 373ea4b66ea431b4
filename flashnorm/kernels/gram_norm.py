"""Gram (ghost) per-sample gradient norms of a Linear layer.

    norm_sq[b] = ‖G_bᵀX_b‖²_F = ⟨X_bX_bᵀ, G_bG_bᵀ⟩ = Σ_{t,s} (x_t·x_s)(g_t·g_s).

Tiled over (t, s) blocks like flash attention, using symmetry (blocks s > t counted twice):
≈ B·T²·(d+p) FLOPs and O(1) extra memory; never a B×T×T tensor. Cheaper than the flash form
roughly when T < 2dp/(d+p). For T = 1 it is the rank-one rule ‖x_b‖²·‖g_b‖².
"""

from __future__ import annotations

import math

import torch

from ._chunks import accumulation_dtype, rows_per_chunk
from .backend import use_triton
from .flash_norm import _check_sequence_pair


def gram_norm_sq_reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: ⟨X_bX_bᵀ, G_bG_bᵀ⟩ for x: [B, T, d], g: [B, T, p] → [B].

    Blocks of ``tb`` steps are chosen so that a chunk's block pair stays under
    ``MAX_CHUNK_ELEMENTS``; accumulates in float32 (float64 for float64 inputs).
    """
    _check_sequence_pair(x, g)
    batch, steps, _ = x.shape
    acc = accumulation_dtype(x, g)
    norm_sq = torch.zeros(batch, dtype=acc, device=x.device)
    tb = max(1, min(steps, math.isqrt(rows_per_chunk(1))))
    samples = rows_per_chunk(tb * tb)
    for b0 in range(0, batch, samples):
        xs, gs = x[b0 : b0 + samples], g[b0 : b0 + samples]
        for t0 in range(0, steps, tb):
            xt, gt = xs[:, t0 : t0 + tb].to(acc), gs[:, t0 : t0 + tb].to(acc)
            for s0 in range(t0, steps, tb):
                xss, gss = xs[:, s0 : s0 + tb].to(acc), gs[:, s0 : s0 + tb].to(acc)
                block = (torch.bmm(xt, xss.transpose(1, 2)) * torch.bmm(gt, gss.transpose(1, 2))).sum(dim=(1, 2))
                norm_sq[b0 : b0 + samples] += block if s0 == t0 else 2 * block
    return norm_sq


def gram_norm_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """⟨X_bX_bᵀ, G_bG_bᵀ⟩ per sample, x: [B, T, d], g: [B, T, p] → float32 [B].

    Dispatches to the Triton kernel on CUDA (or when ``FLASHNORM_BACKEND=triton``), else to
    :func:`gram_norm_sq_reference`.
    """
    if use_triton(x, g):
        from .gram_norm_triton import gram_norm_sq_triton

        return gram_norm_sq_triton(x, g)
    return gram_norm_sq_reference(x, g)
