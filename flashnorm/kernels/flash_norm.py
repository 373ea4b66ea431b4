"""Flash per-sample gradient norms of a Linear layer.

For sample b with input X_b ∈ ℝ^{T×d} and output gradient G_b ∈ ℝ^{T×p}, the per-sample weight
gradient is W_b = G_bᵀX_b ∈ ℝ^{p×d} and

    norm_sq[b] = ‖G_bᵀX_b‖²_F.

The tiled algorithm accumulates each output tile of W_b over T and adds Σ tile² into norm_sq[b];
the tile never reaches memory. Cost: 2·B·T·d·p FLOPs, O(B) extra memory.
"""

from __future__ import annotations

import torch

from ._chunks import accumulation_dtype, rows_per_chunk
from .backend import use_triton


def flash_norm_sq_reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: ‖G_bᵀX_b‖² for x: [B, T, d], g: [B, T, p] → [B] (float32; float64 in).

    Tiles over samples and rows of W_b so that no temporary exceeds ``MAX_CHUNK_ELEMENTS``;
    accumulates in float32 (float64 for float64 inputs).
    """
    _check_sequence_pair(x, g)
    batch, _, d = x.shape
    p = g.shape[-1]
    acc = accumulation_dtype(x, g)
    norm_sq = torch.zeros(batch, dtype=acc, device=x.device)
    p_tile = min(p, rows_per_chunk(d)) if p else 1
    samples = rows_per_chunk(p_tile * d)
    for b0 in range(0, batch, samples):
        xb = x[b0 : b0 + samples].to(acc)
        for p0 in range(0, p, p_tile):
            gb = g[b0 : b0 + samples, :, p0 : p0 + p_tile].to(acc)
            tile = torch.bmm(gb.transpose(1, 2), xb)  # [samples, p_tile, d]
            norm_sq[b0 : b0 + samples] += tile.square().sum(dim=(1, 2))
    return norm_sq


def flash_norm_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖G_bᵀX_b‖²_F per sample, x: [B, T, d], g: [B, T, p] (fp32, bf16 or fp16) → float32 [B].

    Dispatches to the Triton kernel on CUDA (or when ``FLASHNORM_BACKEND=triton``), else to
    :func:`flash_norm_sq_reference`.
    """
    if use_triton(x, g):
        from .flash_norm_triton import flash_norm_sq_triton

        return flash_norm_sq_triton(x, g)
    return flash_norm_sq_reference(x, g)


def _check_sequence_pair(x: torch.Tensor, g: torch.Tensor) -> None:
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"expected x: [B, T, d] and g: [B, T, p] with the same B and T; got {tuple(x.shape)} and {tuple(g.shape)}"
        )
