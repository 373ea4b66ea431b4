"""Clipped weight and bias gradients of a Linear layer, assembled after a one-pass backward.

With clipping coefficients c ∈ ℝ^B:

    weight_grad = Σ_b c_b G_bᵀX_b = (c ⊙ G)ᵀX        (one GEMM over all B·T rows)
    bias_grad   = Σ_b c_b Σ_t G_b[t]

Two ways to the weight gradient: scaling G by c then one cuBLAS GEMM
(`clipped_weight_grad_reference`), or the fused Triton kernel ``_clipped_weight_grad_kernel``
(`clipped_weight_grad_fused`): the flash-norm tile loop, accumulating each sample's tile of
G_bᵀX_b in float32 registers and adding c_b · tile to the output tile, so that c is applied in
float32 to the exact per-sample tile and G is never rewritten. `clipped_weight_grad` picks
one by measurement.

Layout of this file: the Triton kernel, its launch wrapper, then the PyTorch functions.
"""

from __future__ import annotations

from typing import Optional

import torch

from .accumulation import accumulation_dtype
from .backend import INTERPRET, cdiv, multiprocessor_count, resolve_backend, tf32_enabled, use_triton
from .flash_norm import MIN_BLOCKS_PER_SPLIT, flash_norm_config
from .operands import (
    aligned_copies,
    aligned_copies_pay,
    prepare_pair,
    row_operands,
    tma_compatible,
    use_descriptors,
)
from .tiles import accumulate_rows
from .triton_support import tl, triton


@triton.jit(do_not_specialize=["T", "t_chunk", "n_chunks", "units_per_split", "n_units"])
def _clipped_weight_grad_kernel(
    # inputs: x [B*T, d], g [B*T, p] row-major (descriptors over them when USE_TMA, else the tensors), coef [B] float32
    x_desc, g_desc, x_ptr, g_ptr, coef_ptr,
    # output: out [p, d] float32 (atomic adds when ATOMIC: zero it first)
    out_ptr,
    # sizes: a unit is one T chunk of one sample (n_chunks per sample); each split takes units_per_split units
    T, d, p, t_chunk, n_chunks, units_per_split, n_units,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ATOMIC: tl.constexpr, USE_TMA: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """out[tile] (+)= Σ_{units u of this split} c_{b(u)} · (G_bᵀX_b over u's rows)[tile].

    Program id → (output tile, split), the tile varying fastest. Each unit's tile is accumulated in
    float32 registers, scaled by its sample's c_b in float32 and added to the program's total; one
    store (ATOMIC=False: one split) or one atomic add per program.
    """
    pid = tl.program_id(0)
    n_tiles_d = tl.cdiv(d, BLOCK_D)
    n_tiles = tl.cdiv(p, BLOCK_P) * n_tiles_d
    tile = pid % n_tiles
    split = pid // n_tiles
    p0 = (tile // n_tiles_d) * BLOCK_P
    d0 = (tile % n_tiles_d) * BLOCK_D

    total = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    u_start = split * units_per_split
    u_end = tl.minimum(u_start + units_per_split, n_units)
    for u in range(u_start, u_end):
        b = u // n_chunks
        t_start = (u % n_chunks) * t_chunk
        t_end = tl.minimum(t_start + t_chunk, T)
        base = b.to(tl.int64) * T
        acc = accumulate_rows(x_desc, g_desc, x_ptr, g_ptr, base + t_start, base + t_end, p0, d0, p, d,
                              tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32),
                              BLOCK_T, BLOCK_P, BLOCK_D, USE_TMA, ALLOW_TF32)
        total += tl.load(coef_ptr + b) * acc

    rows = p0 + tl.arange(0, BLOCK_P)
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = (rows < p)[:, None] & (cols < d)[None, :]
    ptrs = out_ptr + rows[:, None].to(tl.int64) * d + cols[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, total, mask=mask)
    else:
        tl.store(ptrs, total, mask=mask)


def clipped_weight_grad_work(batch: int, steps: int, n_tiles: int, block_t: int, n_sms: int) -> tuple[int, int, int]:
    """(t_chunk, n_chunks, units_per_split) for `clipped_weight_grad_fused`.

    With n_tiles ≥ SMs every program takes every sample (one store per tile, no atomics). Otherwise the
    samples — and, when there are fewer samples than programs needed per tile, chunks of T of at least
    ``MIN_BLOCKS_PER_SPLIT`` blocks — are spread over ⌈SMs / n_tiles⌉ programs per tile.
    """
    per_tile = max(1, cdiv(n_sms, n_tiles))
    n_chunks = 1
    if batch < per_tile:
        n_chunks = max(1, min(cdiv(per_tile, batch), cdiv(steps, block_t * MIN_BLOCKS_PER_SPLIT)))
    t_chunk = cdiv(cdiv(steps, n_chunks), block_t) * block_t
    n_chunks = cdiv(steps, t_chunk)
    units = batch * n_chunks
    return t_chunk, n_chunks, cdiv(units, min(per_tile, units))


def clipped_weight_grad_fused(
    x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, *, config=None, work: Optional[tuple] = None,
    use_tma: Optional[bool] = None,
) -> torch.Tensor:
    """Triton Σ_b c_b G_bᵀX_b for x: [B, T, d], g: [B, T, p] (fp32, bf16 or fp16), coef: [B] → float32 [p, d].

    ``config`` (tiles, as `flash_norm_config`), ``work``
    (`clipped_weight_grad_work`) and ``use_tma`` have defaults; tests set them to reach every path.
    With ``use_tma`` (by default from `aligned_copies_pay`), rows that are not
    16-byte aligned (GPT-2's 50257 logits) are read from aligned copies (`clipped_on_aligned_copies`).
    float32 inputs use tf32 dots (operands rounded to nearest) when ``torch.backends.cuda.matmul.allow_tf32``
    is set. Several programs adding into one output tile use float32 atomics: the result is exact to
    float32 rounding but its last bits may differ from run to run.
    """
    x, g = prepare_pair(x, g)
    if coef.shape != (x.shape[0],):
        raise ValueError(f"coef must be [B] = [{x.shape[0]}], got {tuple(coef.shape)}")
    batch, steps, d = x.shape
    p = g.shape[-1]
    if 0 in (batch, steps, d, p):
        return torch.zeros(p, d, dtype=torch.float32, device=x.device)
    coef = coef.to(device=x.device, dtype=torch.float32).contiguous()
    x2, g2 = x.view(batch * steps, d), g.view(batch * steps, p)
    aligned = tma_compatible(x2, g2)
    if use_tma is None:
        use_tma = use_descriptors(x2, g2) if aligned else aligned_copies_pay(x2, g2)
    if use_tma and not aligned:
        return clipped_on_aligned_copies(x, g, coef, config, work)
    out = torch.empty(p, d, dtype=torch.float32, device=x.device)
    launch_clipped(x2, g2, coef, out, batch, steps, config, work, use_tma)
    return out


def clipped_on_aligned_copies(x, g, coef, config, work) -> torch.Tensor:
    """Σ_b c_b G_bᵀX_b → float32 [p, d] from aligned copies of operands whose rows are not 16-byte aligned
    (`aligned_copies`: the wider operand plays G, copied a block of columns at a
    time). G's column block c gives the output's rows c, one launch each; the zero rows and columns of the
    padding are dropped, and a swapped result is transposed back. A public name: the tests check that the default
    policy routes unaligned rows here."""
    copies = aligned_copies(x, g)
    batch, steps = x.shape[:2]
    p = copies.g.shape[-1]
    # blocks are whole multiples of the alignment but the last, padded like g: the padded rows of out
    out = torch.empty(p + -p % (16 // copies.g.element_size()), copies.x2.shape[1], dtype=torch.float32, device=x.device)
    for c0 in range(0, p, copies.width):
        g2 = copies.block(c0)
        launch_clipped(copies.x2, g2, coef, out[c0 : c0 + g2.shape[1]], batch, steps, config, work, True)
        g2 = None  # (freed before the next block is copied)
    out = out[:p, : copies.d]
    return out.t().contiguous() if copies.swapped else out.contiguous()


def launch_clipped(x2, g2, coef, out, batch, steps, config, work, use_tma) -> None:
    """One launch of ``_clipped_weight_grad_kernel`` writing Σ_b c_b G_bᵀX_b into ``out``: a contiguous [p, d]
    float32 tensor (zeroed here when programs add into it). A public name: the tests wrap it to count launches."""
    d, p = x2.shape[1], g2.shape[1]
    allow_tf32 = x2.dtype == torch.float32 and tf32_enabled()
    cfg = config or flash_norm_config(d, p, x2.dtype, interpret=INTERPRET)
    n_tiles = cdiv(p, cfg.block_p) * cdiv(d, cfg.block_d)
    t_chunk, n_chunks, per_split = work or clipped_weight_grad_work(
        batch, steps, n_tiles, cfg.block_t, multiprocessor_count(x2.device)
    )
    n_units = batch * n_chunks
    splits = cdiv(n_units, per_split)
    x_desc, g_desc = row_operands(x2, g2, use_tma, cfg.block_t, cfg.block_d, cfg.block_p)
    if splits > 1:
        out.zero_()
    _clipped_weight_grad_kernel[(n_tiles * splits,)](
        x_desc, g_desc, x2, g2, coef, out,
        steps, d, p, t_chunk, n_chunks, per_split, n_units,
        BLOCK_T=cfg.block_t, BLOCK_P=cfg.block_p, BLOCK_D=cfg.block_d,
        ATOMIC=splits > 1, USE_TMA=use_tma, ALLOW_TF32=allow_tf32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _scaled(a: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """c_b · A_b for a: [..., B, T, k] (the samples on the third dimension from the end) in the dtype of a (float32
    or float64: callers never round c ⊙ A to 16 bits), one pass over a."""
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    return torch.mul(a, coef.to(a.dtype).view(-1, 1, 1), out=out)


def clipped_weight_grad(
    x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """(c ⊙ G)ᵀX for x: [B, T, d], g: [B, T, p], coef: [B] → [p, d] (float32; float64 for float64 inputs).

    c is applied in float32 to products that are float32-exact, never by rounding c ⊙ G to a 16-bit dtype: that
    rounding errs by 2⁻⁹ of every term, far beyond the clipping coefficient's float32 allowance
    (`rounding`), and inputs whose terms cancel could push a sample past C. So 16-bit inputs
    take `clipped_weight_grad_fused` on CUDA (and whenever ``backend="triton"``), and
    `clipped_weight_grad_reference` in float32 elsewhere; under ``backend="auto"`` float32 inputs take the
    reference (cuBLAS), which is faster there: the fused kernel has no K-major tf32 path. ``backend``: see
    `use_triton`. Callers cast to the parameter's dtype.
    """
    sixteen_bit = {x.dtype, g.dtype} <= {torch.bfloat16, torch.float16}
    if use_triton(resolve_backend(backend), x, g, name="clipped_weight_grad", reference_faster=not sixteen_bit):
        return clipped_weight_grad_fused(x, g, coef)
    return clipped_weight_grad_reference(x, g, coef)


def clipped_weight_grad_reference(x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """(c ⊙ G)ᵀX for x: [B, T, d], g: [B, T, p], coef: [B] → [p, d] in float32 (float64 for float64 inputs):
    `clipped_weight_grads_stacked` of one layer."""
    return clipped_weight_grads_stacked(x.unsqueeze(0), g.unsqueeze(0), coef)[0]


def clipped_weight_grads_stacked(x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """(c ⊙ G_l)ᵀX_l for L layers' captures stacked, x: [L, B, T, d], g: [L, B, T, p], coef: [B] → [L, p, d] in
    float32 (float64 for float64 inputs).

    Scaling and one (batched) GEMM over each layer's B·T rows: c scales the narrower operand,
    (c ⊙ G)ᵀX = Gᵀ(c ⊙ X) (in float32, 16-bit inputs widened first), so a head's [B, T, V] output gradient is read
    once, by the GEMM.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, g.dtype), torch.float32)
    x, g = x.to(dtype), g.to(dtype)
    if x.shape[-1] < g.shape[-1]:
        x = _scaled(x, coef)
    else:
        g = _scaled(g, coef)
    layers = x.shape[0]
    return torch.bmm(g.reshape(layers, -1, g.shape[-1]).transpose(1, 2), x.reshape(layers, -1, x.shape[-1]))


def clipped_bias_grad(g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Σ_b c_b Σ_t G_b[t] for g: [B, T, p] → [p], or for L layers' captures stacked, [L, B, T, p] → [L, p]
    (float32; float64 for float64): each sample's sum accumulated in float32, then weighted by c in float32
    (c ⊙ G is never rounded to 16 bits)."""
    acc = accumulation_dtype(g)
    return coef.to(acc) @ g.sum(dim=-2, dtype=acc)


def per_sample_weight_grads(
    x: torch.Tensor, g: torch.Tensor, *, out: Optional[torch.Tensor] = None, transposed: bool = False
) -> torch.Tensor:
    """G_bᵀX_b for every sample: [B, p, d], or X_bᵀG_b: [B, d, p] with ``transposed`` (B·d·p memory;
    the planner decides when it fits), by cuBLAS ``bmm`` in the promoted dtype of x and g. ``out``: a
    [B, p, d] (or [B, d, p]) tensor to write into, whose samples may be strided (one slot of a larger buffer).
    """
    if x.dtype != g.dtype:
        dtype = torch.promote_types(x.dtype, g.dtype)
        x, g = x.to(dtype), g.to(dtype)
    if transposed:
        return torch.bmm(x.transpose(1, 2), g, out=out)
    return torch.bmm(g.transpose(1, 2), x, out=out)
