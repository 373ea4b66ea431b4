"""Gram (ghost) per-sample gradient norms of a Linear layer.

    norm_sq[b] = ‖G_bᵀX_b‖²_F = ⟨X_bX_bᵀ, G_bG_bᵀ⟩ = Σ_{t,s} (x_t·x_s)(g_t·g_s).

Tiled over (t, s) blocks like flash attention, using symmetry (blocks s > t counted twice):
≈ B·T²·(d+p) FLOPs and O(1) extra memory; never a B×T×T tensor. Cheaper than the flash form
roughly when T < 2dp/(d+p). For T = 1 it is the rank-one rule ‖x_b‖²·‖g_b‖².

Layout of this file: the Triton kernel ``_gram_norm_kernel``, its config, the launch wrapper
`gram_norm_sq_triton`, the PyTorch reference `gram_norm_sq_reference` and the dispatcher
`gram_norm_sq`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .accumulation import accumulation_dtype, rows_per_chunk
from .backend import INTERPRET, cdiv, resolve_backend, tf32_enabled, use_triton
from .operands import check_sequence_pair, prepare_launch, row_operands, use_descriptors
from .tiles import block_size, dot_acc, load_rows, tf32_copy
from .triton_support import tl, triton

# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "n_blocks"])
def _gram_norm_kernel(
    # inputs: x [B*T, d], g [B*T, p] row-major (descriptors over them when USE_TMA, else the tensors)
    x_desc, g_desc, x_ptr, g_ptr,
    # output: norm_sq [B] float32, accumulated with atomic adds
    norm_sq_ptr,
    # sizes: n_blocks = cdiv(T, BLOCK_T)
    T, d, p, n_blocks,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """norm_sq[b] += c · Σ_{t∈I, s∈J} (x_t·x_s)(g_t·g_s) for one sample b and one block pair I ≤ J.

    Program id → (b, pair k), with pairs enumerated column by column: k = J(J+1)/2 + I, I ≤ J;
    c = 2 when I < J (the (J, I) block is its transpose), else 1. The two [BLOCK_T, BLOCK_T] Gram
    blocks X_I X_Jᵀ and G_I G_Jᵀ are accumulated over d and p in float32 registers.
    """
    # -- program id → sample and block pair (I ≤ J) --------------------------------------------
    pid = tl.program_id(0)
    n_pairs = n_blocks * (n_blocks + 1) // 2
    b = pid // n_pairs
    k = (pid % n_pairs).to(tl.int64)
    j = ((tl.sqrt(8.0 * k.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int64)
    j = tl.where(j * (j + 1) // 2 > k, j - 1, j)  # the float32 root can be one off either way
    j = tl.where((j + 1) * (j + 2) // 2 <= k, j + 1, j)
    i = k - j * (j + 1) // 2

    # -- rows of the two blocks; rows past T (next sample, or zero fill) are masked at the end ----
    row_i = b.to(tl.int64) * T + i * BLOCK_T
    row_j = b.to(tl.int64) * T + j * BLOCK_T
    row_end = b.to(tl.int64) * T + T

    # -- X_I X_Jᵀ over d, then G_I G_Jᵀ over p, in float32 ----------------------------------------
    xx = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        xi = load_rows(x_desc, x_ptr, row_i, row_end, k0, d, BLOCK_T, BLOCK_K, USE_TMA)
        xj = load_rows(x_desc, x_ptr, row_j, row_end, k0, d, BLOCK_T, BLOCK_K, USE_TMA)
        xx = dot_acc(xi, tl.trans(xj), xx, ALLOW_TF32)
    gg = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, p, BLOCK_K):
        gi = load_rows(g_desc, g_ptr, row_i, row_end, k0, p, BLOCK_T, BLOCK_K, USE_TMA)
        gj = load_rows(g_desc, g_ptr, row_j, row_end, k0, p, BLOCK_T, BLOCK_K, USE_TMA)
        gg = dot_acc(gi, tl.trans(gj), gg, ALLOW_TF32)

    # -- epilogue: ⟨·,·⟩ over valid (t, s), doubled off the diagonal ------------------------------
    t_ok = (i * BLOCK_T + tl.arange(0, BLOCK_T)) < T
    s_ok = (j * BLOCK_T + tl.arange(0, BLOCK_T)) < T
    block = tl.sum(tl.where(t_ok[:, None] & s_ok[None, :], xx * gg, 0.0))
    tl.atomic_add(norm_sq_ptr + b, tl.where(i < j, 2.0 * block, block))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class GramConfig(NamedTuple):
    """Block shape and launch settings of ``_gram_norm_kernel``."""

    block_t: int
    block_k: int
    num_warps: int
    num_stages: int


def gram_norm_config(steps: int, d: int, p: int, dtype: torch.dtype, interpret: bool = False) -> GramConfig:
    """Block shape for T = ``steps``: 64-step blocks, 128-wide (16-bit) or 32-wide (float32) K slices.

    16-bit: 64×128, the fastest block shape measured.

    Under the interpreter: 128-step blocks and 64-wide slices (fewer, larger numpy calls).
    """
    if interpret:
        return GramConfig(block_size(steps, 128), block_size(max(d, p), 64), 4, 1)
    block_k = 32 if dtype == torch.float32 else 128
    return GramConfig(block_size(steps, 64), min(block_k, block_size(max(d, p), block_k)), 4, 3)


# ---------------------------------------------------------------------------------------------
# Launch wrapper
# ---------------------------------------------------------------------------------------------


def gram_norm_sq_triton(
    x: torch.Tensor, g: torch.Tensor, *, config: GramConfig | None = None, use_tma: bool | None = None
) -> torch.Tensor:
    """Triton ⟨X_bX_bᵀ, G_bG_bᵀ⟩ for x: [B, T, d], g: [B, T, p] (fp32, bf16 or fp16) → float32 [B].

    ``config`` and ``use_tma`` default to `gram_norm_config` and
    `use_descriptors`. float32 inputs use tf32 dots when ``torch.backends.cuda.matmul.allow_tf32`` is set,
    on copies rounded to nearest tf32. Non-contiguous inputs are copied contiguous; mixed dtypes are
    promoted.
    """
    norm_sq, _ = gram_norm_launch(x, g, config=config, use_tma=use_tma)
    return norm_sq


def gram_norm_launch(x, g, *, config=None, use_tma=None):
    """`gram_norm_sq_triton` returning (norm_sq, compiled kernel or None): the kernel's PTX for inspection.
    Internal but stable for tools: ``benchmarks/`` and the GPU tests call it."""
    # (1) check shapes and dtypes, make rows contiguous; (2) allocate the output
    x, g, norm_sq, empty = prepare_launch(x, g)
    if empty:
        return norm_sq, None
    batch, steps, d = x.shape
    p = g.shape[-1]
    cfg = config or gram_norm_config(steps, d, p, x.dtype, INTERPRET)
    n_blocks = cdiv(steps, cfg.block_t)
    allow_tf32 = x.dtype == torch.float32 and tf32_enabled()
    if allow_tf32:  # round to nearest first: the tensor cores would truncate float32 operands
        x2, g2 = tf32_copy(x, transpose=False)[0].view(batch * steps, d), tf32_copy(g, transpose=False)[0].view(batch * steps, p)
    else:
        x2, g2 = x.view(batch * steps, d), g.view(batch * steps, p)
    if use_tma is None:
        use_tma = use_descriptors(x2, g2)
    x_desc, g_desc = row_operands(x2, g2, use_tma, cfg.block_t, cfg.block_k, cfg.block_k)
    # (3) launch
    kernel = _gram_norm_kernel[(batch * (n_blocks * (n_blocks + 1) // 2),)](
        x_desc, g_desc, x2, g2, norm_sq,
        steps, d, p, n_blocks,
        BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, USE_TMA=use_tma,
        ALLOW_TF32=allow_tf32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return norm_sq, kernel


# ---------------------------------------------------------------------------------------------
# PyTorch reference and dispatcher
# ---------------------------------------------------------------------------------------------


def gram_norm_sq_reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: ⟨X_bX_bᵀ, G_bG_bᵀ⟩ for x: [B, T, d], g: [B, T, p] → [B].

    Blocks of ``tb`` steps are chosen so that a chunk's block pair stays under
    ``MAX_CHUNK_ELEMENTS``; accumulates in float32 (float64 for float64 inputs).
    """
    check_sequence_pair(x, g)
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


def gram_norm_sq(x: torch.Tensor, g: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """⟨X_bX_bᵀ, G_bG_bᵀ⟩ per sample, x: [B, T, d], g: [B, T, p] → float32 [B] (float64 inputs: float64).

    `gram_norm_sq_triton` where ``backend`` (`use_triton`) allows Triton,
    else `gram_norm_sq_reference`.
    """
    if use_triton(resolve_backend(backend), x, g, name="gram_norm_sq"):
        return gram_norm_sq_triton(x, g)
    return gram_norm_sq_reference(x, g)
