"""Flash per-sample gradient norms of a Linear layer.

For sample b with input X_b ∈ ℝ^{T×d} and output gradient G_b ∈ ℝ^{T×p}, the per-sample weight
gradient is W_b = G_bᵀX_b ∈ ℝ^{p×d} and

    norm_sq[b] = ‖G_bᵀX_b‖²_F.

The tiled algorithm accumulates each output tile of W_b over T and adds Σ tile² into norm_sq[b];
the tile never reaches memory. Cost: 2·B·T·d·p FLOPs, O(B) extra memory: about the work of one GEMM
over all B·T rows, whose throughput the kernel approaches once B·tiles fills the GPU (the float32/tf32
path also pays for its K-major copies).

Layout of this file: the Triton kernel ``_flash_norm_kernel`` and its T-split epilogue ``_sum_split_tile``,
their configs and T-split model, the launch wrapper `flash_norm_sq_triton`, the PyTorch reference
`flash_norm_sq_reference` and the dispatcher `flash_norm_sq`. Shared tile helpers live in
`tiles`, operand checks and the TMA policy in `operands`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .accumulation import accumulation_dtype, rows_per_chunk
from .backend import INTERPRET, cdiv, multiprocessor_count, resolve_backend, tf32_enabled, use_triton
from .operands import (
    aligned_copies,
    aligned_copies_pay,
    check_sequence_pair,
    prepare_launch,
    row_operands,
    tma_compatible,
    use_descriptors,
)
from .tiles import accumulate_rows, block_size, dot_acc, round_tf32, tf32_copy
from .triton_support import TensorDescriptor, tl, triton

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "t_chunk", "n_splits"])
def _flash_norm_kernel(
    # inputs: x [B*T, d], g [B*T, p] row-major (descriptors over them when USE_TMA, else the tensors);
    # K_MAJOR: descriptors over tf32-rounded xᵀ [B*d, T] and gᵀ [B*p, T] instead (G_ROWS: g itself as [B, T, p])
    x_desc, g_desc, x_ptr, g_ptr,
    # outputs: norm_sq [B] float32 (atomic adds). SPLIT: work [B, n_tiles, n_splits, BLOCK_P*BLOCK_D] float32
    # partial tiles and arrived [B, n_tiles] int32 counters (zeroed)
    norm_sq_ptr, work_ptr, arrived_ptr,
    # sizes
    T, d, p, t_chunk, n_splits,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, USE_TMA: tl.constexpr, ALLOW_TF32: tl.constexpr, K_MAJOR: tl.constexpr,
    G_ROWS: tl.constexpr,
):
    """norm_sq[b] += ‖(G_bᵀX_b)[tile]‖² for one sample b, one [BLOCK_P, BLOCK_D] tile and one T range.

    Program id → (b, split, tile), the tile index varying fastest. The tile of W_b = G_bᵀX_b is
    accumulated over rows t ∈ [split·t_chunk, min((split+1)·t_chunk, T)) in float32 registers.
    SPLIT=False: Σ tile² is added to norm_sq[b]. SPLIT=True: the partial tile goes to ``work``, then
    the program counts itself in ``arrived``; the last of the tile's n_splits programs to arrive sums
    the partials (in split order: the result does not depend on who is last) and adds Σ tile² to
    norm_sq[b]. No program ever waits on another, and there is no second launch.

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
                g_tile = round_tf32(g_desc.load([b.to(tl.int32), t, p0]).reshape([BLOCK_T, BLOCK_P]))
                acc = dot_acc(tl.trans(g_tile), tl.trans(x_tile), acc, ALLOW_TF32)
            else:
                g_tile = g_desc.load([(b * p + p0).to(tl.int32), t])
                acc = dot_acc(g_tile, tl.trans(x_tile), acc, ALLOW_TF32)
        valid = ((p0 + tl.arange(0, BLOCK_P)) < p)[:, None] & ((d0 + tl.arange(0, BLOCK_D)) < d)[None, :]
        acc = tl.where(valid, acc, 0.0)
    else:
        acc = accumulate_rows(x_desc, g_desc, x_ptr, g_ptr, row0, row_end, p0, d0, p, d, acc,
                               BLOCK_T, BLOCK_P, BLOCK_D, USE_TMA, ALLOW_TF32)

    # -- epilogue: the tile never reaches memory unless T is split ---------------------------------
    if SPLIT:
        tile_id = b.to(tl.int64) * n_tiles + tile
        acc, split = _sum_split_tile(work_ptr, arrived_ptr, tile_id, split, n_splits, acc, BLOCK_P, BLOCK_D)
        if split >= 0:  # the last-arriving program of the tile (the others got split = -1)
            tl.atomic_add(norm_sq_ptr + b, tl.sum(acc * acc))
    else:
        tl.atomic_add(norm_sq_ptr + b, tl.sum(acc * acc))


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


@functools.lru_cache(maxsize=1024)
def flash_norm_config(
    d: int, p: int, dtype: torch.dtype, interpret: bool = False, k_major: bool = False, batch: int = 0, n_sms: int = 0
) -> FlashConfig:
    """Tile shape for x: [batch, ·, d], g: [batch, ·, p] of ``dtype`` on a GPU of ``n_sms`` multiprocessors.

    Each choice is the fastest measured for its case. 16-bit inputs: 64×128×256 (T×p×d) tiles, 8 warps,
    3 stages. When batch × those tiles under-fills the GPU (e.g. B = 1, d = p = 1024: 32 programs on 132 SMs),
    smaller 64×128 output tiles fill it without a T-split (faster than larger tiles split over T):
    128×64×128 with 4 warps and 4 stages when they make one wave, 64×64×128 with 3 stages when up to
    three programs share an SM. float32: 32×128×128; K-major tf32: 32×128×256. Tiles shrink to the
    next power of two of small d and p. Under the interpreter: one large T block and tiles ≤ 64 (it
    runs each program as numpy calls, so fewer, larger steps are faster).
    """
    if interpret:
        return FlashConfig(128, block_size(p, 64), block_size(d, 64), 4, 1)
    if k_major:  # 128×256 output tiles: faster than 128×128 on this path
        return FlashConfig(32, block_size(p, 128), block_size(d, 256), 8, 3)
    if dtype == torch.float32:
        block_t, block_p, block_d = 32, block_size(p, 128), block_size(d, 128)
    else:
        block_t, block_p, block_d = 64, block_size(p, 128), block_size(d, 256)
        small_tiles = batch * -(-p // 64) * -(-d // 128)
        if batch * -(-p // block_p) * -(-d // block_d) < n_sms and small_tiles <= 3 * n_sms:
            one_wave = small_tiles <= n_sms
            return FlashConfig(128 if one_wave else 64, block_size(p, 64), block_size(d, 128), 4, 4 if one_wave else 3)
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
    `flash_norm_config`, `flash_norm_splits`, `use_descriptors`
    and "TMA and tf32"; tests set them to reach every path. With ``use_tma`` (by default from
    `aligned_copies_pay`), rows that are not 16-byte aligned (an odd
    vocabulary: GPT-2's 50257 logits) are first copied, a block of columns at a time, into aligned buffers that
    the descriptors can read (`launch_on_aligned_copies`). float32 inputs use tf32 dots when
    ``torch.backends.cuda.matmul.allow_tf32`` is set (like ``torch.matmul``), with operands rounded to
    nearest; the K-major path first writes tf32-rounded transposed copies of a group of samples
    (at most ``K_MAJOR_GROUP_ELEMENTS`` elements, or one sample) — of x alone when ``g_rows`` (default:
    d ≤ ``G_ROWS_MAX_D``), g then being rounded in registers. Non-contiguous inputs are copied
    contiguous; x and g of different dtypes are promoted to a common one.
    """
    norm_sq, _ = flash_norm_launch(x, g, config=config, splits=splits, use_tma=use_tma, k_major=k_major, g_rows=g_rows)
    return norm_sq


#: K-major path: up to this d, only x gets a transposed copy and g is read row-major through a [B, T, p]
#: descriptor and rounded in registers. That saves g's copy (about a third of the time at d = p = 1024) but
#: slows the tiles (≈ 20% at 1024², 40% at 4096²): a net gain up to d = 1024, a loss beyond.
G_ROWS_MAX_D = 1024

#: Elements of the tf32 transposed copies made at once on the K-major path (1 GiB of float32).
K_MAJOR_GROUP_ELEMENTS = 1 << 28


def flash_norm_launch(x, g, *, config=None, splits=None, use_tma=None, k_major=None, g_rows=None):
    """`flash_norm_sq_triton` returning (norm_sq, last compiled kernel or None): the kernel's PTX, registers
    and shared memory for inspection. Internal but stable for tools: ``benchmarks/`` and the GPU tests call it."""
    # (1) check shapes and dtypes, make rows contiguous; (2) allocate the output
    x, g, norm_sq, empty = prepare_launch(x, g)
    if empty:
        return norm_sq, None
    batch, steps, d = x.shape
    p = g.shape[-1]
    allow_tf32 = x.dtype == torch.float32 and tf32_enabled()
    x2, g2 = x.view(batch * steps, d), g.view(batch * steps, p)
    aligned = tma_compatible(x2, g2)
    if use_tma is None:
        use_tma = use_descriptors(x2, g2) if aligned else aligned_copies_pay(x2, g2)
    if k_major is None:
        k_major = use_tma and allow_tf32 and aligned and batch * max(d, p) < 2**31
    if k_major and not (use_tma and allow_tf32):
        raise ValueError("the K-major layout is the tf32 path: it needs use_tma and float32 inputs with allow_tf32 set")
    if use_tma and not k_major and not aligned:
        return norm_sq, launch_on_aligned_copies(x, g, norm_sq, config, splits, allow_tf32)
    cfg = config or flash_norm_config(
        d, p, x.dtype, INTERPRET, k_major, batch, multiprocessor_count(x.device)
    )
    if not k_major:
        kernel = launch_tiles(
            x2, g2, x2, g2, norm_sq, batch, steps, d, p, cfg, splits, use_tma, allow_tf32, False
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
        kernel = launch_tiles(
            x_desc, g_desc, xs, gs, norm_sq[b0 : b0 + n], n, steps, d, p, cfg, splits, True, True, True, g_rows
        )
    return norm_sq, kernel


def launch_on_aligned_copies(x, g, norm_sq, config, splits, allow_tf32):
    """Descriptor launches on aligned copies of operands whose rows are not 16-byte aligned; returns the last
    compiled kernel (a public name: the tests check that the default policy routes unaligned rows here).

    ‖G_bᵀX_b‖² = ‖X_bᵀG_b‖², so the wider operand plays G, and it is a sum over column blocks c of G:
    Σ_c ‖G_b[:, c]ᵀX_b‖², one launch per block (`aligned_copies`), each adding
    into ``norm_sq``. Zero-padded columns add nothing.
    """
    copies = aligned_copies(x, g)
    batch, steps = x.shape[:2]
    d = copies.x2.shape[1]
    kernel = None
    for c0 in range(0, copies.g.shape[-1], copies.width):
        g2 = copies.block(c0)
        cols = g2.shape[1]
        cfg = config or flash_norm_config(d, cols, x.dtype, INTERPRET, False, batch, multiprocessor_count(x.device))
        kernel = launch_tiles(copies.x2, g2, copies.x2, g2, norm_sq, batch, steps, d, cols, cfg, splits, True,
                              allow_tf32, False)
        g2 = None  # (freed before the next block is copied)
    return kernel


def launch_tiles(x_desc, g_desc, x2, g2, norm_sq, batch, steps, d, p, cfg, splits, use_tma, allow_tf32, k_major,
                 g_rows=False):
    """One launch of ``_flash_norm_kernel`` over ``batch`` samples (with its workspace and counters when T is split),
    adding into ``norm_sq``; returns the compiled kernel.

    Internal but stable for tools: ``benchmarks/`` times the tiles alone on operands it prepared (e.g. the K-major
    tf32 copies), and tests wrap it to count launches. x_desc, g_desc: what `
    row_operands` gives for row-major x2: [batch·steps, d], g2: [batch·steps, p] (ignored unless ``k_major``, whose
    descriptors the caller builds); ``splits`` None: `flash_norm_splits`."""
    n_tiles = cdiv(p, cfg.block_p) * cdiv(d, cfg.block_d)
    if splits is None:
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
        x_desc, g_desc, x2, g2, norm_sq, work, arrived,
        steps, d, p, t_chunk, splits,
        BLOCK_T=cfg.block_t, BLOCK_P=cfg.block_p, BLOCK_D=cfg.block_d,
        SPLIT=splits > 1, USE_TMA=use_tma, ALLOW_TF32=allow_tf32, K_MAJOR=k_major, G_ROWS=g_rows,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return kernel


# ---------------------------------------------------------------------------------------------
# PyTorch reference and dispatcher
# ---------------------------------------------------------------------------------------------


def flash_norm_sq_reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: ‖G_bᵀX_b‖² for x: [B, T, d], g: [B, T, p] → [B] (float32; float64 in).

    Tiles over samples and rows of W_b so that no temporary exceeds ``MAX_CHUNK_ELEMENTS``;
    accumulates in float32 (float64 for float64 inputs).
    """
    check_sequence_pair(x, g)
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


def flash_norm_sq(x: torch.Tensor, g: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """‖G_bᵀX_b‖²_F per sample, x: [B, T, d], g: [B, T, p] (fp32, bf16 or fp16) → float32 [B].

    `flash_norm_sq_triton` on CUDA or with ``backend="triton"``, else `flash_norm_sq_reference`
    (``backend``: see `use_triton`). float64 inputs always take the
    reference, which returns float64.
    """
    if use_triton(resolve_backend(backend), x, g, name="flash_norm_sq"):
        return flash_norm_sq_triton(x, g)
    return flash_norm_sq_reference(x, g)


