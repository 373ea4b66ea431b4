"""The logits of a linear cross-entropy head a tile at a time: never a rows × vocabulary tensor.

Rows r (the B·T positions of a batch) have hidden states x_r ∈ ℝ^d, targets y_r and weights α_r (0 for an ignored
row); the head is W ∈ ℝ^{V×d} with bias b ∈ ℝ^V (optional), so z_r = W x_r + b. Two primitives, each over a range of
the vocabulary [v0, v1):

* **statistics** (`logit_stats`): per row, lse_r = log Σ_v exp(z_rv), the target's logit z_{r,y_r} (0 when y_r
  is outside the range) and Σ_v z_rv (label smoothing's term). Ranges combine by log-add-exp and sums, so the
  forward pass takes the whole vocabulary block by block;
* **gradient block** (`logit_grad_block`): G[r, v] = α_r·(exp(z_rv − lse_r) − (1 − ε)·[v = y_r] − ε/V), the
  gradient of Σ_r α_r·CE_ε(z_r, y_r) with respect to the block's logits, for rows [r0, r1) (ε: label smoothing).

Each is a GEMM X·W_blockᵀ (2·rows·(v1 − v0)·d FLOPs, accumulated in float32 by ``tl.dot``, operands loaded through
TMA tensor descriptors on Hopper) with its epilogue fused: the statistics kernel reduces its logit tile to per-row
partials (the partials of the range's tiles are then combined), the gradient kernel writes G's tile in the inputs'
dtype. The logits never reach memory.

Two calls of the gradient kernel on the same rows and block return the same G bit for bit (the same tiles, each
element by the same K loop of a configuration that depends on the kernel, d and the dtype alone, no atomics): the
passes of a clipping step, which form G's blocks on one tiling, apply exactly the G they measured.

Layout of this file: the Triton kernels and their shared logit tile, their configuration, the launch wrappers, the
PyTorch references and the dispatchers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch

from .accumulation import accumulation_dtype, rows_per_chunk
from .backend import INTERPRET, cdiv, resolve_backend, supports_tma, tf32_enabled, use_triton
from .operands import TRITON_DTYPES, tma_compatible
from .tiles import block_size, dot_acc, load_rows, round_tf32
from .triton_support import TensorDescriptor, tl, triton

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(x_desc, w_desc, x_ptr, w_ptr, b_ptr, row0, n_rows, col0, vocab, d,
                 HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 USE_TMA: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """z[row0 : row0+BLOCK_T, col0 : col0+BLOCK_V] = x·Wᵀ (+ b) in float32, for row-major x: [n_rows, d] and
    W: [vocab, d]. Rows past n_rows and columns past ``vocab`` read zeros (callers mask what they store); the K loop
    is the same for every tile."""
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        x_tile = load_rows(x_desc, x_ptr, row0, n_rows, k0, d, BLOCK_T, BLOCK_D, USE_TMA)
        w_tile = load_rows(w_desc, w_ptr, col0, vocab, k0, d, BLOCK_V, BLOCK_D, USE_TMA)
        if ALLOW_TF32:
            x_tile, w_tile = round_tf32(x_tile), round_tf32(w_tile)
        acc = dot_acc(x_tile, tl.trans(w_tile), acc, ALLOW_TF32)
    if HAS_BIAS:
        cols = col0 + tl.arange(0, BLOCK_V)
        acc += tl.load(b_ptr + cols, mask=cols < vocab, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tile_ids(pid, n_row_tiles, n_col_tiles, GROUP: tl.constexpr):
    """Program id → (row tile, column tile), GROUP row tiles at a time (the programs running together share
    their W tiles and their x tiles in L2, as in a grouped GEMM)."""
    per_group = GROUP * n_col_tiles
    first = (pid // per_group) * GROUP
    rows_here = tl.minimum(n_row_tiles - first, GROUP)
    return first + (pid % per_group) % rows_here, (pid % per_group) // rows_here


@triton.jit(do_not_specialize=["n_rows", "v0", "v1"])
def _logit_stats_kernel(
    # inputs: x [n_rows, d], w [V, d] row-major (descriptors over them when USE_TMA, else the tensors), b [V], y [n_rows]
    x_desc, w_desc, x_ptr, w_ptr, b_ptr, y_ptr,
    # output: part [4, n_col_tiles, n_rows] float32: per row and column tile, (max, Σ exp(z − max), z_y, Σ z)
    part_ptr,
    # sizes: the vocabulary range [v0, v1) of V columns
    n_rows, v0, v1, vocab, d,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr, USE_TMA: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """Per-row partial statistics of one [BLOCK_T, BLOCK_V] logit tile of the range [v0, v1):
    m = max_v z, s = Σ_v exp(z − m), z_y = z at the row's target if it lies in the tile (else 0), Σ_v z."""
    n_row_tiles = tl.cdiv(n_rows, BLOCK_T)
    n_col_tiles = tl.cdiv(v1 - v0, BLOCK_V)
    row_tile, col_tile = _tile_ids(tl.program_id(0), n_row_tiles, n_col_tiles, GROUP)
    row0 = row_tile * BLOCK_T
    col0 = v0 + col_tile * BLOCK_V
    z = _logits_tile(x_desc, w_desc, x_ptr, w_ptr, b_ptr, row0, n_rows, col0, vocab, d,
                     HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_D, USE_TMA, ALLOW_TF32)

    rows = row0 + tl.arange(0, BLOCK_T)
    cols = col0 + tl.arange(0, BLOCK_V)
    in_range = (cols < v1)[None, :]
    z_in = tl.where(in_range, z, float("-inf"))
    m = tl.max(z_in, axis=1)
    s = tl.sum(tl.exp(z_in - m[:, None]), axis=1)
    y = tl.load(y_ptr + rows, mask=rows < n_rows, other=-1)
    z_y = tl.sum(tl.where(in_range & (cols[None, :] == y[:, None]), z, 0.0), axis=1)
    z_sum = tl.sum(tl.where(in_range, z, 0.0), axis=1)

    out = part_ptr + col_tile.to(tl.int64) * n_rows + rows
    plane = n_col_tiles.to(tl.int64) * n_rows
    keep = rows < n_rows
    tl.store(out, m, mask=keep)
    tl.store(out + plane, s, mask=keep)
    tl.store(out + 2 * plane, z_y, mask=keep)
    tl.store(out + 3 * plane, z_sum, mask=keep)


@triton.jit(do_not_specialize=["n_rows", "r0", "r1", "v0", "v1"])
def _logit_grad_kernel(
    # inputs: x [n_rows, d], w [V, d] (descriptors when USE_TMA), b [V], y [n_rows], lse [n_rows] float32,
    # alpha [n_rows] float32
    x_desc, w_desc, x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, alpha_ptr,
    # output: g [r1 - r0, out_stride] (columns v0..v1 at 0..v1 - v0), in its own dtype
    g_ptr, out_stride,
    # sizes: rows [r0, r1) of n_rows, columns [v0, v1) of V
    n_rows, r0, r1, v0, v1, vocab, d,
    # label smoothing: keep = 1 − ε, spread = ε / V
    keep, spread,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr, USE_TMA: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """g[r − r0, v − v0] = α_r·(exp(z_rv − lse_r) − keep·[v = y_r] − spread) for one [BLOCK_T, BLOCK_V] tile."""
    n_row_tiles = tl.cdiv(r1 - r0, BLOCK_T)
    n_col_tiles = tl.cdiv(v1 - v0, BLOCK_V)
    row_tile, col_tile = _tile_ids(tl.program_id(0), n_row_tiles, n_col_tiles, GROUP)
    row0 = r0 + row_tile * BLOCK_T
    col0 = v0 + col_tile * BLOCK_V
    z = _logits_tile(x_desc, w_desc, x_ptr, w_ptr, b_ptr, row0, n_rows, col0, vocab, d,
                     HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_D, USE_TMA, ALLOW_TF32)

    rows = row0 + tl.arange(0, BLOCK_T)
    cols = col0 + tl.arange(0, BLOCK_V)
    row_ok = rows < r1
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    alpha = tl.load(alpha_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == y[:, None], keep, 0.0) - spread
    g = alpha[:, None] * g
    ptrs = g_ptr + (rows - r0)[:, None].to(tl.int64) * out_stride + (cols - v0)[None, :]
    tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < v1)[None, :])


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


class LogitConfig(NamedTuple):
    """Tile shape and launch settings of one logit kernel."""

    block_t: int
    block_v: int
    block_d: int
    group: int
    num_warps: int
    num_stages: int


#: The logit kernels by name (`logit_config`'s ``kernel``).
LOGIT_KERNELS = ("stats", "grad")


@functools.lru_cache(maxsize=256)
def logit_config(d: int, dtype: torch.dtype, interpret: bool = False, kernel: str = "stats") -> LogitConfig:
    """Tiles of the ``kernel`` ("stats" or "grad") for hidden size d and input ``dtype``: a function of (kernel, d,
    dtype) alone, so every call on a head takes the same tiles and K loop (the gradient kernel's bit-for-bit
    repeatability rests on it).

    16-bit, from the sweep `benchmarks/kernels/sweep_logit_tiles.py` (H100, 32,768 rows, d = 2048, V = 128,256; the
    results in `benchmarks/results/kernels_h100_logit_tiles.json`): the statistics in 256×128 tiles, 8 warps, K steps
    of 64 over 4 stages (528 TFLOP/s against 460 for 128×128 over 3 stages); G in 64×256 tiles, 4 warps, 4 stages
    (540 against 442: the narrower row tile halves the registers its exp epilogue holds). float32: 64×64×32. Under the
    interpreter: 32×64 tiles with the whole of a small d per step (numpy calls are the cost there)."""
    if kernel not in LOGIT_KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(LOGIT_KERNELS)}")
    if interpret:
        return LogitConfig(32, 64, block_size(d, 64), 4, 4, 1)
    if dtype == torch.float32:
        return LogitConfig(64, 64, block_size(d, 32), 8, 4, 3)
    if kernel == "stats":
        return LogitConfig(256, 128, block_size(d, 64), 8, 8, 4)
    return LogitConfig(64, 256, block_size(d, 64), 8, 4, 4)


# ---------------------------------------------------------------------------------------------
# Launch wrappers
# ---------------------------------------------------------------------------------------------


def _operands(x2: torch.Tensor, w: torch.Tensor, cfg: LogitConfig, use_tma: Optional[bool]):
    """(x_desc, w_desc, use_tma): tensor descriptors over x2 [rows, d] and w [V, d] on Hopper when their rows are
    16-byte aligned (``use_tma`` None), else the tensors themselves."""
    if use_tma is None:
        use_tma = supports_tma(x2.device) and tma_compatible(x2, w)
    if not use_tma:
        return x2, w, False
    return (TensorDescriptor.from_tensor(x2, [cfg.block_t, cfg.block_d]),
            TensorDescriptor.from_tensor(w, [cfg.block_v, cfg.block_d]), True)


def _check_operands(x2: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if x2.dim() != 2 or w.dim() != 2 or x2.shape[1] != w.shape[1]:
        raise ValueError(f"expected x: [rows, d] and weight: [V, d]; got {tuple(x2.shape)} and {tuple(w.shape)}")
    if x2.dtype != w.dtype or x2.dtype not in TRITON_DTYPES:
        raise TypeError(f"the logit kernels take x and weight of one dtype among {TRITON_DTYPES}; got {x2.dtype} "
                        f"and {w.dtype}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias must be [V] = [{w.shape[0]}], got {tuple(bias.shape)}")


def logit_stats_triton(x2, w, bias, y, v0, v1, *, config=None, use_tma=None) -> Tuple[torch.Tensor, ...]:
    """Triton `logit_stats`: one launch over every (row tile, column tile) of the range, then the partials
    of the range's column tiles combined per row (float32)."""
    return logit_stats_launch(x2, w, bias, y, v0, v1, config=config, use_tma=use_tma)[0]


def logit_stats_launch(x2, w, bias, y, v0, v1, *, config=None, use_tma=None):
    """`logit_stats_triton` returning ((lse, z_y, z_sum), the compiled kernel or None): its PTX for the GPU
    tests and tools."""
    _check_operands(x2, w, bias)
    x2, w = x2.contiguous(), w.contiguous()
    n_rows, d = x2.shape
    cfg = config or logit_config(d, x2.dtype, INTERPRET, "stats")
    n_col_tiles = cdiv(v1 - v0, cfg.block_v)
    part = torch.empty(4, n_col_tiles, n_rows, dtype=torch.float32, device=x2.device)
    kernel = None
    if n_rows and v1 > v0:
        x_desc, w_desc, tma = _operands(x2, w, cfg, use_tma)
        grid = (cdiv(n_rows, cfg.block_t) * n_col_tiles,)
        kernel = _logit_stats_kernel[grid](
            x_desc, w_desc, x2, w, bias if bias is not None else w, y.contiguous(), part,
            n_rows, v0, v1, w.shape[0], d,
            HAS_BIAS=bias is not None, BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            GROUP=cfg.group, USE_TMA=tma, ALLOW_TF32=x2.dtype == torch.float32 and tf32_enabled(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    m, s, z_y, z_sum = part
    top = m.max(dim=0).values
    lse = top + (s * torch.exp(m - top)).sum(dim=0).log()
    return (lse, z_y.sum(dim=0), z_sum.sum(dim=0)), kernel


def logit_grad_block_triton(x2, r0, r1, w, bias, v0, v1, lse, y, alpha, keep, spread, *, out=None, config=None,
                            use_tma=None) -> torch.Tensor:
    """Triton `logit_grad_block`: G [r1 − r0, v1 − v0] in x's dtype (or into ``out``)."""
    return logit_grad_block_launch(x2, r0, r1, w, bias, v0, v1, lse, y, alpha, keep, spread, out=out, config=config,
                                   use_tma=use_tma)[0]


def logit_grad_block_launch(x2, r0, r1, w, bias, v0, v1, lse, y, alpha, keep, spread, *, out=None, config=None,
                            use_tma=None):
    """`logit_grad_block_triton` returning (G, the compiled kernel or None)."""
    _check_operands(x2, w, bias)
    x2, w = x2.contiguous(), w.contiguous()
    n_rows, d = x2.shape
    cfg = config or logit_config(d, x2.dtype, INTERPRET, "grad")
    g = out if out is not None else torch.empty(r1 - r0, v1 - v0, dtype=x2.dtype, device=x2.device)
    kernel = None
    if r1 > r0 and v1 > v0:
        x_desc, w_desc, tma = _operands(x2, w, cfg, use_tma)
        grid = (cdiv(r1 - r0, cfg.block_t) * cdiv(v1 - v0, cfg.block_v),)
        kernel = _logit_grad_kernel[grid](
            x_desc, w_desc, x2, w, bias if bias is not None else w, y.contiguous(), lse.contiguous(),
            alpha.contiguous(), g, g.stride(0),
            n_rows, r0, r1, v0, v1, w.shape[0], d, float(keep), float(spread),
            HAS_BIAS=bias is not None, BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            GROUP=cfg.group, USE_TMA=tma, ALLOW_TF32=x2.dtype == torch.float32 and tf32_enabled(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return g, kernel


# ---------------------------------------------------------------------------------------------
# PyTorch references and dispatchers
# ---------------------------------------------------------------------------------------------


def _logits_reference(x2, w, bias, r0, r1, v0, v1) -> torch.Tensor:
    """z [r1 − r0, v1 − v0] in the accumulation dtype (float32, float64 for float64)."""
    acc = accumulation_dtype(x2, w)
    z = x2[r0:r1].to(acc) @ w[v0:v1].to(acc).T
    return z if bias is None else z + bias[v0:v1].to(acc)


def logit_stats_reference(x2, w, bias, y, v0, v1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of `logit_stats`, chunked over rows (no temporary beyond ``MAX_CHUNK_ELEMENTS``),
    in the accumulation dtype."""
    n_rows = x2.shape[0]
    acc = accumulation_dtype(x2, w)
    lse, z_y, z_sum = (torch.empty(n_rows, dtype=acc, device=x2.device) for _ in range(3))
    rows = rows_per_chunk(v1 - v0)
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        z = _logits_reference(x2, w, bias, r0, r1, v0, v1)
        lse[r0:r1], z_y[r0:r1], z_sum[r0:r1] = logit_row_stats(z, y[r0:r1], v0)
    return lse, z_y, z_sum


def logit_row_stats(z: torch.Tensor, y: torch.Tensor, v0: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, z_y, z_sum) [rows] of logits z [rows, V_J] that are the vocabulary's columns [v0, v0 + V_J), for
    targets y [rows] (z_y = 0 where y lies outside them), in z's dtype; differentiable (the unfused head's loss,
    `flashnorm.layers.FusedLinearCrossEntropy.logit_losses`, takes its gradient through them)."""
    width = z.shape[1]
    local = y - v0
    inside = (local >= 0) & (local < width)
    picked = z.gather(1, local.clamp(0, max(0, width - 1)).unsqueeze(1)).squeeze(1)
    return torch.logsumexp(z, dim=1), torch.where(inside, picked, torch.zeros_like(picked)), z.sum(dim=1)


def logit_grad_block_reference(x2, r0, r1, w, bias, v0, v1, lse, y, alpha, keep, spread) -> torch.Tensor:
    """PyTorch reference of `logit_grad_block`: G [r1 − r0, v1 − v0] in the accumulation dtype."""
    z = _logits_reference(x2, w, bias, r0, r1, v0, v1)
    g = torch.exp(z - lse[r0:r1].to(z.dtype).unsqueeze(1))
    cols = torch.arange(v0, v1, device=x2.device)
    g -= keep * (cols.unsqueeze(0) == y[r0:r1].unsqueeze(1)).to(g.dtype)
    g -= spread
    return g.mul_(alpha[r0:r1].to(g.dtype).unsqueeze(1))


def logit_stats(x2, w, bias, y, v0, v1, *, backend: Optional[str] = None):
    """Per-row statistics of the logits z = x2·Wᵀ + b over the vocabulary range [v0, v1).

    Args:
        x2: [rows, d]; w: [V, d] of x2's dtype; bias: [V] or None; y: [rows] int64 targets.

    Returns:
        (lse, z_y, z_sum), each [rows] float32 (float64 for float64 inputs): log Σ_v exp z_v over the range, the
        target's logit where it lies in the range (else 0), Σ_v z_v over the range.
    """
    if use_triton(resolve_backend(backend), x2, w, name="logit_stats"):
        return logit_stats_triton(x2, w, bias, y, v0, v1)
    return logit_stats_reference(x2, w, bias, y, v0, v1)


def logit_grad_block(x2, r0, r1, w, bias, v0, v1, lse, y, alpha, keep, spread, *, backend: Optional[str] = None):
    """G[r − r0, v − v0] = α_r·(exp(z_rv − lse_r) − keep·[v = y_r] − spread) for rows [r0, r1), columns [v0, v1).

    Args:
        x2: [rows, d]; w: [V, d]; bias: [V] or None; lse: [rows] float32 (float64) from `logit_stats` over the
            whole vocabulary; y: [rows] int64; alpha: [rows] float32 (float64); keep = 1 − ε, spread = ε/V.

    Returns:
        [r1 − r0, v1 − v0]: in x2's dtype from the Triton kernel (each element rounded once, from float32), in the
        accumulation dtype from the reference. Two calls with the same arguments return the same values bit for bit.
    """
    if use_triton(resolve_backend(backend), x2, w, name="logit_grad_block"):
        return logit_grad_block_triton(x2, r0, r1, w, bias, v0, v1, lse, y, alpha, keep, spread)
    return logit_grad_block_reference(x2, r0, r1, w, bias, v0, v1, lse, y, alpha, keep, spread)
