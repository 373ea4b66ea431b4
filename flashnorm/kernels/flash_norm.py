"""Flash per-sample gradient norms of a Linear layer.

For sample b with input X_b ∈ ℝ^{T×d} and output gradient G_b ∈ ℝ^{T×p}, the per-sample weight
gradient is W_b = G_bᵀX_b ∈ ℝ^{p×d} and

    norm_sq[b] = ‖G_bᵀX_b‖²_F.

The tiled algorithm accumulates each output tile of W_b over T and adds Σ tile² into norm_sq[b];
the tile never reaches memory. Cost: 2·B·T·d·p FLOPs, O(B) extra memory.

On the H200 (benchmarks/results/kernels_h200.json) the bf16 kernel runs at 0.91-1.05× the
throughput of a cuBLAS GEMM doing the same 2·B·T·d·p FLOPs once B·tiles fills the GPU, and the
float32/tf32 path at 0.77-1.6× (it pays for K-major copies; cuBLAS is slow on this layout too).

Layout of this file: the Triton kernels (``_flash_norm_kernel``, its T-split epilogue
``_sum_split_tile`` and the tf32 rounding copy ``_tf32_copy_kernel``), their configs, the
launch wrapper :func:`flash_norm_sq_triton`, the PyTorch reference :func:`flash_norm_sq_reference`
and the dispatcher :func:`flash_norm_sq`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ._chunks import accumulation_dtype, rows_per_chunk
from .backend import cdiv, dispatch, interpreter_enabled, multiprocessor_count, supports_tma, tf32_enabled

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # flashnorm imports without Triton; the dispatcher then always takes the reference
    from .backend import _TritonStub as triton

    tl = TensorDescriptor = None

#: Input dtypes the Triton kernels take (float64 always goes to the reference, which stays float64).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(desc, ptr, row0, row_end, col0, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
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
def _dot_acc(a, b, acc, ALLOW_TF32: tl.constexpr):
    """acc + a @ b in float32 (tf32 products for float32 inputs only when ALLOW_TF32)."""
    if ALLOW_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _accumulate_rows(x_desc, g_desc, x_ptr, g_ptr, row0, row_end, p0, d0, p, d, acc,
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
        g_tile = _load_rows(g_desc, g_ptr, row, row_end, p0, p, BLOCK_T, BLOCK_P, USE_TMA)
        x_tile = _load_rows(x_desc, x_ptr, row, row_end, d0, d, BLOCK_T, BLOCK_D, USE_TMA)
        if ALLOW_TF32:
            g_tile, x_tile = _round_tf32(g_tile), _round_tf32(x_tile)
        acc = _dot_acc(tl.trans(g_tile), x_tile, acc, ALLOW_TF32)
    row = row0 + n_full * BLOCK_T
    if row < row_end:
        g_tile = _load_rows(g_desc, g_ptr, row, row_end, p0, p, BLOCK_T, BLOCK_P, False)
        x_tile = _load_rows(x_desc, x_ptr, row, row_end, d0, d, BLOCK_T, BLOCK_D, False)
        if ALLOW_TF32:
            g_tile, x_tile = _round_tf32(g_tile), _round_tf32(x_tile)
        acc = _dot_acc(tl.trans(g_tile), x_tile, acc, ALLOW_TF32)
    return acc


@triton.jit
def _round_tf32(v):
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
    v = _round_tf32(v)
    if TRANSPOSE:
        dst = dst_ptr + m * cols * dst_stride + c[None, :].to(tl.int64) * dst_stride + r[:, None]
    else:
        dst = dst_ptr + m * rows * dst_stride + r[:, None].to(tl.int64) * dst_stride + c[None, :]
    tl.store(dst, v, mask=mask)


@triton.jit(do_not_specialize=["T", "t_chunk", "n_splits"])
def _flash_norm_kernel(
    # inputs: x [B*T, d], g [B*T, p] row-major (descriptors over them when USE_TMA, else the tensors);
    # K_MAJOR: descriptors over tf32-rounded xᵀ [B*d, T] and gᵀ [B*p, T] instead (G_ROWS: g itself as [B, T, p])
    x_desc, g_desc, x_ptr, g_ptr,
    # outputs: norm_sq [B] float32 (atomic adds). SPLIT: work [B, n_tiles, n_splits, BLOCK_P*BLOCK_D] float32
    # partial tiles and arrived [B, n_tiles] int32 counters (zeroed). STORE_GRADS: grads, W_b as [B, p, d]
    # (GRADS_DP: X_bᵀG_b as [B, d, p]), rows contiguous, sample stride grads_stride
    norm_sq_ptr, work_ptr, arrived_ptr, grads_ptr, grads_stride,
    # sizes
    T, d, p, t_chunk, n_splits,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, USE_TMA: tl.constexpr, ALLOW_TF32: tl.constexpr, K_MAJOR: tl.constexpr,
    G_ROWS: tl.constexpr, STORE_GRADS: tl.constexpr, GRADS_DP: tl.constexpr,
):
    """norm_sq[b] += ‖(G_bᵀX_b)[tile]‖² for one sample b, one [BLOCK_P, BLOCK_D] tile and one T range.

    Program id → (b, split, tile), the tile index varying fastest. The tile of W_b = G_bᵀX_b is
    accumulated over rows t ∈ [split·t_chunk, min((split+1)·t_chunk, T)) in float32 registers.
    SPLIT=False: Σ tile² is added to norm_sq[b]. SPLIT=True: the partial tile goes to ``work``, then
    the program counts itself in ``arrived``; the last of the tile's n_splits programs to arrive sums
    the partials (in split order: the result does not depend on who is last) and adds Σ tile² to
    norm_sq[b]. No program ever waits on another, and there is no second launch. STORE_GRADS (never
    split): the tile is also written, rounded once to the dtype of ``grads``: the per-sample gradient
    from the same 2·T·BLOCK_P·BLOCK_D FLOPs.

    float32 with ALLOW_TF32: tf32 dots on operands rounded to nearest (in registers; K_MAJOR: by
    ``_tf32_copy_kernel``, whose K-major copies feed the tensor cores straight from the TMA buffers,
    since tf32 operands cannot be transposed there).
    """
    # -- program id → sample, T split and output tile ------------------------------------------
    pid = tl.program_id(0)
    n_tiles_d = tl.cdiv(d, BLOCK_D)
    n_tiles = tl.cdiv(p, BLOCK_P) * n_tiles_d
    tile = pid % n_tiles
    split = (pid // n_tiles) % n_splits
    b = pid // (n_tiles * n_splits)
    p0 = (tile // n_tiles_d) * BLOCK_P
    d0 = (tile % n_tiles_d) * BLOCK_D

    # -- rows of this program: full blocks (TMA-able), then at most one masked tail block ---------
    t_start = split * t_chunk
    t_end = tl.minimum(t_start + t_chunk, T)
    row0 = b.to(tl.int64) * T + t_start
    row_end = b.to(tl.int64) * T + t_end

    # -- accumulate the tile of G_bᵀX_b over T in float32 -----------------------------------------
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    if K_MAJOR:
        # rows (b, feature), columns t: the descriptors zero-fill columns ≥ T, so no tail; feature
        # rows past p or d (the next sample's) only reach output rows/columns masked below
        for t in range(t_start, t_end, BLOCK_T):
            x_tile = x_desc.load([(b * d + d0).to(tl.int32), t])
            if G_ROWS:  # g row-major through a [B, T, p] descriptor (zero past T), rounded in registers
                g_tile = _round_tf32(g_desc.load([b.to(tl.int32), t, p0]).reshape([BLOCK_T, BLOCK_P]))
                acc = _dot_acc(tl.trans(g_tile), tl.trans(x_tile), acc, ALLOW_TF32)
            else:
                g_tile = g_desc.load([(b * p + p0).to(tl.int32), t])
                acc = _dot_acc(g_tile, tl.trans(x_tile), acc, ALLOW_TF32)
        valid = ((p0 + tl.arange(0, BLOCK_P)) < p)[:, None] & ((d0 + tl.arange(0, BLOCK_D)) < d)[None, :]
        acc = tl.where(valid, acc, 0.0)
    else:
        acc = _accumulate_rows(x_desc, g_desc, x_ptr, g_ptr, row0, row_end, p0, d0, p, d, acc,
                               BLOCK_T, BLOCK_P, BLOCK_D, USE_TMA, ALLOW_TF32)

    # -- epilogue: the tile never reaches memory unless T is split ---------------------------------
    if SPLIT:
        tile_id = b.to(tl.int64) * n_tiles + tile
        acc, split = _sum_split_tile(work_ptr, arrived_ptr, tile_id, split, n_splits, acc, BLOCK_P, BLOCK_D)
        if split >= 0:  # the last-arriving program of the tile (the others got split = -1)
            tl.atomic_add(norm_sq_ptr + b, tl.sum(acc * acc))
    else:
        tl.atomic_add(norm_sq_ptr + b, tl.sum(acc * acc))
        if STORE_GRADS:
            _store_tile(grads_ptr + b.to(tl.int64) * grads_stride, acc, p0, d0, p, d, BLOCK_P, BLOCK_D, GRADS_DP)


@triton.jit
def _store_tile(out_ptr, acc, p0, d0, p, d, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, DP: tl.constexpr):
    """Writes tile ``acc`` = W[p0 : p0+BLOCK_P, d0 : d0+BLOCK_D] of one sample's W: [p, d] (row-major at
    out_ptr) or, with DP, of Wᵀ: [d, p]; rounded to the output's dtype, edges masked."""
    rows = p0 + tl.arange(0, BLOCK_P)
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = (rows < p)[:, None] & (cols < d)[None, :]
    value = acc.to(out_ptr.dtype.element_ty)
    if DP:
        tl.store(out_ptr + cols[None, :].to(tl.int64) * p + rows[:, None], value, mask=mask)
    else:
        tl.store(out_ptr + rows[:, None].to(tl.int64) * d + cols[None, :], value, mask=mask)


@triton.jit
def _sum_split_tile(work_ptr, arrived_ptr, tile_id, split, n_splits, acc, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Σ_s of the n_splits partial tiles of output tile ``tile_id``, in the program that completes it.

    Stores this program's partial ``acc`` into work[tile_id, split], then counts the program in
    arrived[tile_id] (a CTA barrier first, then an acquire-release atomic: the stores of every thread
    are visible before the count). The program that arrives last loads all partials from L2 in split
    order and returns (Σ_s work[tile_id, s], split); the others return (acc, -1) and are done.
    """
    offs = tl.arange(0, BLOCK_P)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    tile_work = work_ptr + tile_id * n_splits * (BLOCK_P * BLOCK_D)
    tl.store(tile_work + split * (BLOCK_P * BLOCK_D) + offs, acc)
    tl.debug_barrier()
    count = tl.atomic_add(arrived_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
    if count == n_splits - 1:
        acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for s in range(n_splits):
            acc += tl.load(tile_work + s * (BLOCK_P * BLOCK_D) + offs, cache_modifier=".cg")
    else:
        split = -1
    return acc, split


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


class FlashConfig(NamedTuple):
    """Tile shape and launch settings of ``_flash_norm_kernel``."""

    block_t: int
    block_p: int
    block_d: int
    num_warps: int
    num_stages: int


#: Fewest BLOCK_T steps a T-split program gets, so that its load pipeline fills.
MIN_BLOCKS_PER_SPLIT = 4
#: Cost model of the T-split choice (H200 figures; only their ratios matter): dot rate of one SM
#: by input dtype (tf32 for float32), workspace bandwidth (L2) and the fixed cost of a split launch
#: (zeroing the counters, the last program's serial sum).
SM_FLOPS = {torch.bfloat16: 4.5e12, torch.float16: 4.5e12, torch.float32: 2.2e12}
WORKSPACE_BYTES_PER_S = 4e12
SPLIT_FIXED_S = 2e-6


def _block(n: int, cap: int) -> int:
    """Smallest power of two ≥ n (at least 16, the smallest dot), capped."""
    return min(cap, max(16, 1 << max(0, n - 1).bit_length()))


@functools.lru_cache(maxsize=1024)
def flash_norm_config(
    d: int, p: int, dtype: torch.dtype, interpret: bool = False, k_major: bool = False, batch: int = 0, n_sms: int = 0
) -> FlashConfig:
    """Tile shape for x: [batch, ·, d], g: [batch, ·, p] of ``dtype`` on a GPU of ``n_sms`` multiprocessors.

    16-bit inputs: 64×128×256 (T×p×d) tiles, 8 warps, 3 stages (H200: within 3% of the best of five
    configs swept, benchmarks/results/kernels_h200_sweep1.json). When batch × those tiles under-fills
    the GPU (e.g. B = 1, d = p = 1024: 32 programs on 132 SMs), smaller 64×128 output tiles fill it
    without a T-split: 128×64×128 with 4 warps and 4 stages when they make one wave (H200, B = 1,
    d = p = 1024, CUDA-graph time against cuBLAS: 0.82-0.85× at T = 4100, 0.95-0.97× at T = 8196,
    against 0.71-0.73× with 3 stages and 0.60× for 128×128 tiles split in two,
    benchmarks/results/kernels_h200_split_stages.json), 64×64×128 with 3 stages when up to three
    programs share an SM (768×3072: 0.79-0.80× against 0.66-0.69× with 4 stages and 0.59× split).
    float32: 32×128×128; K-major tf32: 32×128×256 (kernels_h200_sweep2.json). Tiles shrink to the
    next power of two of small d and p. Under the interpreter: one large T block and tiles ≤ 64 (it
    runs each program as numpy calls, so fewer, larger steps are faster).
    """
    if interpret:
        return FlashConfig(128, _block(p, 64), _block(d, 64), 4, 1)
    if k_major:  # H200 sweep (benchmarks/results/kernels_h200_sweep2.json): 128×256 tiles 1.2-1.3× 128×128
        return FlashConfig(32, _block(p, 128), _block(d, 256), 8, 3)
    if dtype == torch.float32:
        block_t, block_p, block_d = 32, _block(p, 128), _block(d, 128)
    else:
        block_t, block_p, block_d = 64, _block(p, 128), _block(d, 256)
        small_tiles = batch * -(-p // 64) * -(-d // 128)
        if batch * -(-p // block_p) * -(-d // block_d) < n_sms and small_tiles <= 3 * n_sms:
            one_wave = small_tiles <= n_sms
            return FlashConfig(128 if one_wave else 64, _block(p, 64), _block(d, 128), 4, 4 if one_wave else 3)
    num_warps = 8 if block_p * block_d >= 128 * 128 else 4
    return FlashConfig(block_t, block_p, block_d, num_warps, 3)


@functools.lru_cache(maxsize=4096)
def flash_norm_splits(batch: int, steps: int, n_tiles: int, cfg: FlashConfig, n_sms: int, dtype: torch.dtype) -> int:
    """How many programs share one sample's T range (1 = no T-split).

    Minimises waves(S) · t_tile / S + (S > 1) · (workspace traffic + ``SPLIT_FIXED_S``), where
    t_tile = 2·T·BLOCK_P·BLOCK_D / ``SM_FLOPS`` is one unsplit program's time, waves(S) =
    ⌈B·tiles·S / SMs⌉ and the workspace traffic is B·tiles·(2S - 1) float32 tiles (S stores, the
    S - 1 others' partials read by the last program of each tile).
    Each program keeps at least ``MIN_BLOCKS_PER_SPLIT`` BLOCK_T steps; S never exceeds 4 waves.
    """
    programs = batch * n_tiles
    tile_elems = cfg.block_p * cfg.block_d
    t_tile = 2 * steps * tile_elems / SM_FLOPS.get(dtype, SM_FLOPS[torch.float32])
    max_splits = max(1, min(cdiv(steps, cfg.block_t * MIN_BLOCKS_PER_SPLIT), 4 * n_sms // programs))

    def cost(s: int) -> float:
        waves = cdiv(programs * s, n_sms)
        workspace = 4 * tile_elems * programs * (2 * s - 1) / WORKSPACE_BYTES_PER_S + SPLIT_FIXED_S if s > 1 else 0.0
        return waves * t_tile / s + workspace

    return min(range(1, max_splits + 1), key=cost)


# ---------------------------------------------------------------------------------------------
# Launch wrapper
# ---------------------------------------------------------------------------------------------


def flash_norm_sq_triton(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    config: FlashConfig | None = None,
    splits: int | None = None,
    use_tma: bool | None = None,
    k_major: bool | None = None,
    g_rows: bool | None = None,
) -> torch.Tensor:
    """Triton ‖G_bᵀX_b‖² for x: [B, T, d], g: [B, T, p] (fp32, bf16 or fp16) → float32 [B].

    ``config``, ``splits`` (programs per sample's T range), ``use_tma`` and ``k_major`` default to
    :func:`flash_norm_config`, :func:`flash_norm_splits`, :func:`use_descriptors`
    and "TMA and tf32"; tests set them to reach every path. float32 inputs use tf32 dots when
    ``torch.backends.cuda.matmul.allow_tf32`` is set (like ``torch.matmul``), with operands rounded to
    nearest; the K-major path first writes tf32-rounded transposed copies of a group of samples
    (at most ``K_MAJOR_GROUP_ELEMENTS`` elements, or one sample) — of x alone when ``g_rows`` (default:
    d ≤ ``G_ROWS_MAX_D``), g then being rounded in registers. Non-contiguous inputs are copied
    contiguous; x and g of different dtypes are promoted to a common one.
    """
    norm_sq, _ = _flash_norm_launch(x, g, config=config, splits=splits, use_tma=use_tma, k_major=k_major, g_rows=g_rows)
    return norm_sq


def flash_norm_sq_and_grads(
    x: torch.Tensor, g: torch.Tensor, *, out: torch.Tensor | None = None, transposed: bool = False, **launch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ‖G_bᵀX_b‖² and the per-sample gradients W_b = G_bᵀX_b themselves, from one pass of the flash tiles.

    x: [B, T, d], g: [B, T, p] (fp32, bf16 or fp16) → (norm_sq float32 [B], W: [B, p, d]; with
    ``transposed``, X_bᵀG_b: [B, d, p]). 2·B·T·d·p FLOPs and B·d·p memory: each tile is accumulated in
    float32, added to the norm, and written once, rounded to the dtype of ``out`` (default: the inputs'
    dtype). ``out`` may be a slot of a larger buffer: its rows must be contiguous, its sample stride is
    free. The norm is that of the float32 tiles, before rounding. ``launch``: the keywords of
    :func:`flash_norm_sq_triton` (``splits`` is ignored: the tiles are never split).
    """
    x, g = prepare_pair(x, g)
    batch, _, d = x.shape
    p = g.shape[-1]
    shape = (batch, d, p) if transposed else (batch, p, d)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != shape or out.device != x.device or (out.numel() and out.stride()[1:] != (shape[2], 1)):
        raise ValueError(
            f"out must be a {list(shape)} tensor on {x.device} with contiguous rows (sample stride free); "
            f"got {list(out.shape)} with strides {out.stride()} on {out.device}"
        )
    if not out.is_floating_point():
        raise TypeError(f"out must be a floating-point tensor, got {out.dtype}")
    norm_sq, _ = _flash_norm_launch(x, g, grads=out, grads_dp=transposed, **launch)
    if x.shape[1] == 0:
        out.zero_()  # T = 0: nothing was launched, and W_b = 0
    return norm_sq, out


#: K-major path: up to this d, only x gets a transposed copy and g is read row-major through a [B, T, p]
#: descriptor and rounded in registers. That saves g's copy (about a third of the time at d = p = 1024) but
#: slows the tiles (≈ 20% at 1024², 40% at 4096²). H200, CUDA-graph time against cuBLAS
#: (benchmarks/results/kernels_h200_tf32.json): B=8, d=p=1024: 0.89× against 0.83× (T=4100) and 0.88×
#: against 0.81× (T=8196); B=8, 768×3072: 1.07× against 1.06×; B=3, 2048²: 0.87× against 0.90×;
#: B=1, 4096², T=65536: 1.02× against 1.26×.
G_ROWS_MAX_D = 1024

#: Elements of the tf32 transposed copies made at once on the K-major path (1 GiB of float32).
K_MAJOR_GROUP_ELEMENTS = 1 << 28


def _flash_norm_launch(x, g, *, config=None, splits=None, use_tma=None, k_major=None, g_rows=None, grads=None, grads_dp=False):
    """Launch ``_flash_norm_kernel`` (writing the tiles into ``grads`` when given, see
    :func:`flash_norm_sq_and_grads`); returns (norm_sq, last compiled kernel or None)."""
    # (1) check shapes and dtypes, make rows contiguous; (2) allocate the output
    x, g, norm_sq, empty = prepare_launch(x, g)
    if empty:
        return norm_sq, None
    batch, steps, d = x.shape
    p = g.shape[-1]
    allow_tf32 = x.dtype == torch.float32 and tf32_enabled()
    x2, g2 = x.view(batch * steps, d), g.view(batch * steps, p)
    if use_tma is None:
        use_tma = use_descriptors(x2, g2)
    if k_major is None:
        k_major = use_tma and allow_tf32 and batch * max(d, p) < 2**31
    if k_major and not (use_tma and allow_tf32):
        raise ValueError("the K-major layout is the tf32 path: it needs use_tma and float32 inputs with allow_tf32 set")
    cfg = config or flash_norm_config(
        d, p, x.dtype, interpreter_enabled(), k_major, batch, multiprocessor_count(x.device)
    )
    if not k_major:
        kernel = _launch_tiles(
            x2, g2, x2, g2, norm_sq, batch, steps, d, p, cfg, splits, use_tma, allow_tf32, False, grads=grads, grads_dp=grads_dp
        )
        return norm_sq, kernel
    # (3) K-major tf32 path: per group of samples, rounded transposed copies (of x alone with g_rows), then the tiles
    if g_rows is None:
        g_rows = d <= G_ROWS_MAX_D
    group = max(1, K_MAJOR_GROUP_ELEMENTS // (steps * (d + p)))
    for b0 in range(0, batch, group):
        xs, gs = x[b0 : b0 + group], g[b0 : b0 + group]
        n = xs.shape[0]
        x_desc = TensorDescriptor(*tf32_copy(xs, transpose=True), block_shape=[cfg.block_d, cfg.block_t])
        if g_rows:
            g_desc = TensorDescriptor(gs, [n, steps, p], [steps * p, p, 1], [1, cfg.block_t, cfg.block_p])
        else:
            g_desc = TensorDescriptor(*tf32_copy(gs, transpose=True), block_shape=[cfg.block_p, cfg.block_t])
        kernel = _launch_tiles(
            x_desc, g_desc, xs, gs, norm_sq[b0 : b0 + n], n, steps, d, p, cfg, splits, True, True, True, g_rows,
            grads=None if grads is None else grads[b0 : b0 + n], grads_dp=grads_dp,
        )
    return norm_sq, kernel


def _launch_tiles(x_desc, g_desc, x2, g2, norm_sq, batch, steps, d, p, cfg, splits, use_tma, allow_tf32, k_major, g_rows=False,
                  grads=None, grads_dp=False):
    """One launch of ``_flash_norm_kernel`` over ``batch`` samples (with its workspace and counters when T is
    split; never split when the tiles go to ``grads``)."""
    n_tiles = cdiv(p, cfg.block_p) * cdiv(d, cfg.block_d)
    if grads is not None:
        splits = 1
    elif splits is None:
        splits = flash_norm_splits(batch, steps, n_tiles, cfg, multiprocessor_count(x2.device), x2.dtype)
    t_chunk = cdiv(cdiv(steps, splits), cfg.block_t) * cfg.block_t
    splits = cdiv(steps, t_chunk)
    if not k_major:
        x_desc, g_desc = row_operands(x2, g2, use_tma, cfg.block_t, cfg.block_d, cfg.block_p)
    work = arrived = norm_sq
    if splits > 1:
        work = torch.empty(batch * n_tiles * splits * cfg.block_p * cfg.block_d, dtype=torch.float32, device=x2.device)
        arrived = torch.zeros(batch * n_tiles, dtype=torch.int32, device=x2.device)
    kernel = _flash_norm_kernel[(batch * splits * n_tiles,)](
        x_desc, g_desc, x2, g2, norm_sq, work, arrived, norm_sq if grads is None else grads,
        0 if grads is None else grads.stride(0),
        steps, d, p, t_chunk, splits,
        BLOCK_T=cfg.block_t, BLOCK_P=cfg.block_p, BLOCK_D=cfg.block_d,
        SPLIT=splits > 1, USE_TMA=use_tma, ALLOW_TF32=allow_tf32, K_MAJOR=k_major, G_ROWS=g_rows,
        STORE_GRADS=grads is not None, GRADS_DP=grads_dp,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return kernel


def tf32_copy(m: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, list[int], list[int]]:
    """tf32-rounded copy of m: [n, rows, cols] float32 → (buffer, shape, strides) of a 2-D view.

    transpose=False: [n·rows, cols] row-major. transpose=True: mᵀ per matrix as [n·cols, rows]
    with rows padded to a multiple of 4 (16-byte aligned, as tensor descriptors need).
    """
    n, rows, cols = m.shape
    stride = cdiv(rows, 4) * 4 if transpose else cols
    out = torch.empty(n * (cols if transpose else rows) * stride, dtype=torch.float32, device=m.device)
    # transposed: 128 rows × 32 columns per program, 1.12× the bandwidth of 64×64 on the H200
    # (3.85 against 3.39 TB/s, ``fp32copy`` rows of benchmarks/results/kernels_h200_underfilled.json)
    block_r, block_c = (128, 32) if transpose else (64, 64)
    grid = (n * cdiv(rows, block_r) * cdiv(cols, block_c),)
    _tf32_copy_kernel[grid](m, out, rows, cols, stride, TRANSPOSE=transpose, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    if transpose:
        return out, [n * cols, rows], [stride, 1]
    return out, [n * rows, cols], [cols, 1]


def prepare_launch(x: torch.Tensor, g: torch.Tensor):
    """:func:`prepare_pair`, plus the zeroed float32 output [B] and whether any size is 0 (nothing to launch).

    Returns:
        (x, g, norm_sq, empty).
    """
    x, g = prepare_pair(x, g)
    norm_sq = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    return x, g, norm_sq, 0 in (*x.shape, g.shape[-1])


def prepare_pair(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, contiguous x: [B, T, d] and g: [B, T, p] of one Triton dtype (promoted if they differ).

    Raises:
        ValueError: shapes that are not [B, T, d] and [B, T, p], or tensors on different devices.
        TypeError: a dtype the Triton kernels do not take (float64 and others: use the reference).
    """
    _check_sequence_pair(x, g)
    if x.device != g.device:
        raise ValueError(f"x is on {x.device} but g is on {g.device}; move both to one device.")
    dtype = torch.promote_types(x.dtype, g.dtype)
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"the Triton norm kernels take float32, float16 or bfloat16 inputs, got {x.dtype} and {g.dtype}; "
            "use the *_reference functions (float64 stays float64 there)."
        )
    return x.to(dtype).contiguous(), g.to(dtype).contiguous()


#: Work (rows · d · p) from which 16-bit and float32 (tf32 off) launches use tensor descriptors by default.
#: The launcher encodes two tensor maps per launch, 20-30 µs more host time on the H200 machine, for a
#: GPU saving in bf16 of 1-12 µs per flash launch and 6-70 µs (5-10 %) per clipped-gradient launch, and
#: none in float32 (``tma_tradeoff`` rows of benchmarks/results/kernels_h200_tma.json). Below this work
#: (≈ 0.2 ms of bf16 tiles) a step tends to wait for the host, not the GPU (GPT-2 at B = 8, T = 1024:
#: 1.5-1.9·10¹⁰ per layer), so pointer loads are faster where it counts.
TMA_MIN_WORK = 1 << 36
#: float32 with tf32: rows (B·T) from which descriptors are used. They enable the K-major tf32 path
#: (tiles 1.2-1.3× faster, benchmarks/results/kernels_h200_sweep2.json), whose launches are long.
TMA_MIN_ROWS_TF32 = 1024


def use_descriptors(x2: torch.Tensor, g2: torch.Tensor) -> bool:
    """Default of ``use_tma`` for row-major x2: [rows, d], g2: [rows, p]: compute capability 9.x, aligned rows,
    and at least ``TMA_MIN_WORK`` of work (``TMA_MIN_ROWS_TF32`` rows for float32 with tf32)."""
    if not (supports_tma(x2.device) and tma_compatible(x2, g2)):
        return False
    if x2.dtype == torch.float32 and tf32_enabled():
        return x2.shape[0] >= TMA_MIN_ROWS_TF32
    return x2.shape[0] * x2.shape[1] * g2.shape[1] >= TMA_MIN_WORK


def row_operands(x2: torch.Tensor, g2: torch.Tensor, use_tma: bool, block_rows: int, block_x: int, block_g: int):
    """The kernels' (x_desc, g_desc) for row-major x2: [rows, d], g2: [rows, p]: tensor descriptors with
    [block_rows, block_x] and [block_rows, block_g] boxes when ``use_tma``, else the matrices themselves."""
    if not use_tma:
        return x2, g2
    return TensorDescriptor.from_tensor(x2, [block_rows, block_x]), TensorDescriptor.from_tensor(g2, [block_rows, block_g])


def tma_compatible(*matrices: torch.Tensor) -> bool:
    """Whether 2-D row-major matrices meet the tensor-descriptor rules (16-byte aligned base and rows, < 2³¹ rows)."""
    return all(
        m.data_ptr() % 16 == 0 and (m.stride(0) * m.element_size()) % 16 == 0 and m.shape[0] < 2**31 for m in matrices
    )


# ---------------------------------------------------------------------------------------------
# PyTorch reference and dispatcher
# ---------------------------------------------------------------------------------------------


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

    Dispatches to :func:`flash_norm_sq_triton` on CUDA (or when ``FLASHNORM_BACKEND=triton``), else
    to :func:`flash_norm_sq_reference`. float64 inputs always take the reference, which returns float64.
    """
    return dispatch(flash_norm_sq_triton, flash_norm_sq_reference, x, g)


def _check_sequence_pair(x: torch.Tensor, g: torch.Tensor) -> None:
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"expected x: [B, T, d] and g: [B, T, p] with the same B and T; got {tuple(x.shape)} and {tuple(g.shape)}"
        )
