"""Clipped weight and bias gradients of a Linear layer, assembled after a one-pass backward.

With clipping coefficients c ∈ ℝ^B:

    weight_grad = Σ_b c_b G_bᵀX_b = (c ⊙ G)ᵀX        (one GEMM over all B·T rows)
    bias_grad   = Σ_b c_b Σ_t G_b[t]
"""

from __future__ import annotations

from typing import Optional

import torch


def _scaled(g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """c_b · G_b in the dtype of g, multiplied in float32 and rounded once (one pass over g)."""
    out = torch.empty_like(g, memory_format=torch.contiguous_format)
    return torch.mul(g, coef.to(torch.promote_types(g.dtype, torch.float32)).view(-1, *([1] * (g.dim() - 1))), out=out)


def clipped_weight_grad(x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """(c ⊙ G)ᵀX for x: [B, T, d], g: [B, T, p], coef: [B] → [p, d] in the dtype of x and g.

    Scaling and one cuBLAS GEMM over all B·T rows. On the H200 (benchmarks/results/kernels_h200.json,
    ``clipped_weight_grad`` rows, eager timing) the scaling pass adds 25% to the GEMM at
    B·T = 32k-64k rows and d, p ≥ 4096 (bf16), more at smaller shapes, so a kernel fusing c_b into the
    GEMM (as the flash kernel's loop, which runs at 0.92-1.05× cuBLAS) should win; it is not written yet.
    """
    dtype = torch.promote_types(x.dtype, g.dtype)
    scaled = _scaled(g.to(dtype), coef).reshape(-1, g.shape[-1])
    return scaled.t().mm(x.to(dtype).reshape(-1, x.shape[-1]))


def clipped_bias_grad(g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Σ_b c_b Σ_t G_b[t] for g: [B, T, p] → [p]."""
    return _scaled(g, coef).sum(dim=(0, 1))


def per_sample_weight_grads(
    x: torch.Tensor, g: torch.Tensor, *, out: Optional[torch.Tensor] = None, transposed: bool = False
) -> torch.Tensor:
    """G_bᵀX_b for every sample: [B, p, d], or X_bᵀG_b: [B, d, p] with ``transposed`` (B·d·p memory;
    the planner decides when it fits). ``out``: a [B, p, d] (or [B, d, p]) tensor to write into, whose
    rows may be strided (one slot of a larger buffer)."""
    dtype = torch.promote_types(x.dtype, g.dtype)
    x, g = x.to(dtype), g.to(dtype)
    if transposed:
        return torch.bmm(x.transpose(1, 2), g, out=out)
    return torch.bmm(g.transpose(1, 2), x, out=out)
