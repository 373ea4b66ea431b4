"""Clipped sum of stored per-sample gradients: one weighted sum of rows.

For per-sample gradients laid out as A ∈ ℝ^{B×N} (row b: sample b's gradients, any float dtype)
and clipping coefficients c ∈ ℝ^B,

    out[j] = Σ_b c_b · A[b, j]          (float32; float64 for float64 inputs)

A GEMV, but with c and the accumulation in float32 whatever A's dtype: ``coef.to(bf16) @ A``
would round c_b to 8 bits, scaling a sample's contribution by up to 1 + 2⁻⁸ — past the clipping
bound C — and round the sum to bf16. Memory-bound: one read of A, one float32 write.

Layout of this file: the Triton kernel ``_weighted_row_sum_kernel``, its launch wrapper, the
PyTorch reference and the dispatcher `weighted_row_sum`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .accumulation import accumulation_dtype, rows_per_chunk
from .backend import INTERPRET, cdiv, resolve_backend, use_triton
from .triton_support import tl, triton


@triton.jit(do_not_specialize=["batch", "n"])
def _weighted_row_sum_kernel(coef_ptr, a_ptr, out_ptr, batch, n, stride_b, BLOCK_N: tl.constexpr):
    """out[cols] = Σ_b coef[b] · a[b, cols] for one BLOCK_N-wide block of columns, in float32."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_ptrs = a_ptr + cols  # advanced one row per sample: 64-bit pointer arithmetic, no b·stride_b overflow
    for b in range(batch):
        c = tl.load(coef_ptr + b)
        acc += c * tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)
        row_ptrs += stride_b
    tl.store(out_ptr + cols, acc, mask=mask)


def weighted_row_sum_triton(coef: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Triton Σ_b c_b A[b] for coef: [B], a: [B, N] (rows may be strided, columns contiguous) → float32 [N]."""
    _check(coef, a)
    if a.stride(1) != 1:
        a = a.contiguous()
    batch, n = a.shape
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    if n == 0:
        return out
    if batch == 0:
        return out.zero_()
    block = 1 << 14 if INTERPRET else 2048
    _weighted_row_sum_kernel[(cdiv(n, block),)](
        coef.to(torch.float32).contiguous(), a, out, batch, n, a.stride(0), BLOCK_N=block, num_warps=8
    )
    return out


def weighted_row_sum_reference(coef: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: Σ_b c_b A[b] → [N] in float32 (float64 for float64 inputs).

    Column chunks bound the float32 copy of A to ``MAX_CHUNK_ELEMENTS``.
    """
    _check(coef, a)
    acc = accumulation_dtype(coef, a)
    batch, n = a.shape
    out = torch.empty(n, dtype=acc, device=a.device)
    coef = coef.to(acc)
    step = rows_per_chunk(batch)
    for j in range(0, n, step):
        out[j : j + step] = coef @ a[:, j : j + step].to(acc)
    return out


def weighted_row_sum(coef: torch.Tensor, a: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Σ_b c_b A[b] for coef: [B], a: [B, N] → [N], float32 (float64 for float64 inputs).

    Triton on CUDA or with ``backend="triton"``, the reference elsewhere (``backend``: see
    `use_triton`).
    """
    if use_triton(resolve_backend(backend), coef, a, name="weighted_row_sum"):
        return weighted_row_sum_triton(coef, a)
    return weighted_row_sum_reference(coef, a)


def _check(coef: torch.Tensor, a: torch.Tensor) -> None:
    if coef.dim() != 1 or a.dim() != 2 or coef.shape[0] != a.shape[0]:
        raise ValueError(f"expected coef: [B] and a: [B, N]; got {tuple(coef.shape)} and {tuple(a.shape)}")
