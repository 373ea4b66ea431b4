"""Triton tile helpers shared by the norm kernels: row-block loads, float32 dots, the tile of G_bᵀX_b over a
row range, round-to-nearest tf32 (in registers, or as a copy), and power-of-two block sizes.

Callers launch nothing here but `tf32_copy`; the ``@triton.jit`` helpers are inlined into their kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backend import cdiv
from .triton_support import tl, triton


def block_size(n: int, cap: int) -> int:
    """Smallest power of two ≥ n (at least 16, the smallest dot), capped."""
    return min(cap, max(16, 1 << max(0, n - 1).bit_length()))


@triton.jit
def load_rows(desc, ptr, row0, row_end, col0, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              USE_TMA: tl.constexpr):
    """Tile [BLOCK_R, BLOCK_C] of a row-major [rows, n_cols] matrix starting at (row0, col0).

    USE_TMA: through the tensor descriptor (bulk tensor copy; columns past n_cols and rows past the
    matrix are zero-filled by the hardware, rows past ``row_end`` are *not* masked: callers only ask
    for full row blocks). Otherwise plain pointers with int64 offsets, rows ≥ row_end and columns
    ≥ n_cols masked to zero.
    """
    if USE_TMA:
        tile = desc.load([row0.to(tl.int32), col0])
    else:
        rows = row0.to(tl.int64) + tl.arange(0, BLOCK_R)
        cols = col0 + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < row_end) & (cols[None, :] < n_cols)
        tile = tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    return tile


@triton.jit
def dot_acc(a, b, acc, ALLOW_TF32: tl.constexpr):
    """acc + a @ b in float32 (tf32 products for float32 inputs only when ALLOW_TF32)."""
    if ALLOW_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def accumulate_rows(x_desc, g_desc, x_ptr, g_ptr, row0, row_end, p0, d0, p, d, acc,
                    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_TMA: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc + (G[r]ᵀX[r])[p0 : p0+BLOCK_P, d0 : d0+BLOCK_D] over rows r ∈ [row0, row_end) of the row-major
    x: [rows, d], g: [rows, p], in float32.

    Full BLOCK_T blocks first (through the descriptors when USE_TMA), then at most one tail block with
    masked pointer loads: rows ≥ row_end belong to the next sample and must contribute nothing.
    float32 with ALLOW_TF32: operands rounded to nearest tf32 in registers.
    """
    n_full = (row_end - row0) // BLOCK_T
    for i in range(n_full):
        row = row0 + i * BLOCK_T
        g_tile = load_rows(g_desc, g_ptr, row, row_end, p0, p, BLOCK_T, BLOCK_P, USE_TMA)
        x_tile = load_rows(x_desc, x_ptr, row, row_end, d0, d, BLOCK_T, BLOCK_D, USE_TMA)
        if ALLOW_TF32:
            g_tile, x_tile = round_tf32(g_tile), round_tf32(x_tile)
        acc = dot_acc(tl.trans(g_tile), x_tile, acc, ALLOW_TF32)
    row = row0 + n_full * BLOCK_T
    if row < row_end:
        g_tile = load_rows(g_desc, g_ptr, row, row_end, p0, p, BLOCK_T, BLOCK_P, False)
        x_tile = load_rows(x_desc, x_ptr, row, row_end, d0, d, BLOCK_T, BLOCK_D, False)
        if ALLOW_TF32:
            g_tile, x_tile = round_tf32(g_tile), round_tf32(x_tile)
        acc = dot_acc(tl.trans(g_tile), x_tile, acc, ALLOW_TF32)
    return acc


@triton.jit
def round_tf32(v):
    """float32 → nearest tf32 (10-bit mantissa, ties away from zero), kept in float32; NaN stays NaN.

    The tensor cores read float32 operands by dropping the low 13 mantissa bits (truncation, a bias
    of about -2⁻¹¹ per operand, -1.4e-3 on ‖G_bᵀX_b‖²); operands rounded here first are exact.
    """
    bits = v.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, rounded)


@triton.jit
def _tf32_copy_kernel(src_ptr, dst_ptr, rows, cols, dst_stride, TRANSPOSE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst = round_tf32(src) for src: [n, rows, cols] row-major.

    TRANSPOSE: dst[m, c, r] with row stride ``dst_stride`` ≥ rows (the K-major layout the tf32 tensor
    cores read without a shuffle); else dst[m, r, c] with row stride ``dst_stride`` ≥ cols.
    """
    pid = tl.program_id(0)
    n_r = tl.cdiv(rows, BLOCK_R)
    n_c = tl.cdiv(cols, BLOCK_C)
    m = (pid // (n_r * n_c)).to(tl.int64)
    r = (pid % (n_r * n_c)) // n_c * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    v = tl.load(src_ptr + m * rows * cols + r[:, None].to(tl.int64) * cols + c[None, :], mask=mask, other=0.0)
    v = round_tf32(v)
    if TRANSPOSE:
        dst = dst_ptr + m * cols * dst_stride + c[None, :].to(tl.int64) * dst_stride + r[:, None]
    else:
        dst = dst_ptr + m * rows * dst_stride + r[:, None].to(tl.int64) * dst_stride + c[None, :]
    tl.store(dst, v, mask=mask)


def tf32_copy(
    m: torch.Tensor, transpose: bool, *, block: Optional[tuple[int, int]] = None, num_warps: int = 4,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """tf32-rounded copy of m: [n, rows, cols] float32 → (buffer, shape, strides) of a 2-D view.

    transpose=False: [n·rows, cols] row-major. transpose=True: mᵀ per matrix as [n·cols, rows]
    with rows padded to a multiple of 4 (16-byte aligned, as tensor descriptors need).

    ``block`` (rows, columns of m per program), ``num_warps`` and ``out`` (a float32 buffer of at least the copy's
    size, written from its start) are internal but stable for tools: ``benchmarks/`` sweeps the launch settings;
    the kernels take the defaults.
    """
    n, rows, cols = m.shape
    stride = cdiv(rows, 4) * 4 if transpose else cols
    size = n * (cols if transpose else rows) * stride
    if out is None:
        out = torch.empty(size, dtype=torch.float32, device=m.device)
    elif out.dtype != torch.float32 or out.device != m.device or not out.is_contiguous() or out.numel() < size:
        raise ValueError(f"out must be a contiguous float32 buffer of at least {size} elements on {m.device}")
    # transposed: 128 rows × 32 columns per program, the fastest block measured for this copy
    block_r, block_c = block or ((128, 32) if transpose else (64, 64))
    grid = (n * cdiv(rows, block_r) * cdiv(cols, block_c),)
    _tf32_copy_kernel[grid](m, out, rows, cols, stride, TRANSPOSE=transpose, BLOCK_R=block_r, BLOCK_C=block_c,
                            num_warps=num_warps)
    if transpose:
        return out, [n * cols, rows], [stride, 1]
    return out, [n * rows, cols], [cols, 1]
