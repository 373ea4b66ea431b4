"""Per-sample gradients of a LayerNorm's or RMSNorm's weight and bias, from one pass over x and g.

For x, g: [B, T, n] (T: the positions that share the parameters, n: the normalised size) and x̂ each
row of x normalised with the layer's ε — LayerNorm: (x − μ)/√(σ² + ε), RMSNorm: x/√(mean(x²) + ε),
with the biased variance of ``torch.nn.functional.layer_norm``:

    W[b] = Σ_t G_b[t] ⊙ x̂_b[t],      β[b] = Σ_t G_b[t]          (float32 [B, n] each)

The reference recomputes x̂ with PyTorch's own function (a [B, T, n] float32 temporary), multiplies,
and sums twice: four launches and four to six passes over B·T·n. The Triton kernel reads x and g
once, normalises BLOCK_T rows at a time in registers and accumulates both sums in float32. When B
alone would leave the GPU idle, programs split T and add their partial sums into zeroed outputs with
float32 atomics (exact to float32 rounding; the last bits may differ from run to run).

The kernel is the default on CUDA (`affine_norm_grads`): with one read of x and g against the
reference's several passes, it takes a fraction of the reference's GPU time at transformers' LayerNorm and
RMSNorm shapes, for about the same host time per call.

Layout of this file: the Triton kernel, its launch wrapper, the PyTorch reference and the dispatcher.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .accumulation import accumulation_dtype
from .backend import cdiv, multiprocessor_count, resolve_backend, use_triton
from .tiles import block_size
from .triton_support import tl, triton

#: Widest normalised size the kernel holds in registers (two rows of x and g per step, plus both sums).
MAX_N = 4096
#: Elements of one [BLOCK_T, BLOCK_N] tile of x (and of g) on the GPU.
TILE_ELEMENTS = 4096
#: Fewest BLOCK_T-row blocks a T-split program gets.
MIN_BLOCKS_PER_SPLIT = 4


@triton.jit(do_not_specialize=["T", "t_chunk"])
def _affine_norm_grads_kernel(
    x_ptr, g_ptr, w_ptr, b_ptr,
    T, n, t_chunk, stride_xb, stride_gb, stride_wb, stride_bb, eps,
    CENTER: tl.constexpr, BIAS: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (b, s): rows [s·t_chunk, (s+1)·t_chunk) of sample b. w[b] (+)= Σ_t g ⊙ x̂, b[b] (+)= Σ_t g."""
    sample = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * t_chunk
    t_end = tl.minimum(t0 + t_chunk, T)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_rows = x_ptr + sample * stride_xb
    g_rows = g_ptr + sample * stride_gb
    for t in range(t0, t_end, BLOCK_T):
        rows = t + tl.arange(0, BLOCK_T)
        ok = (rows < t_end)[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * n + cols[None, :]
        x = tl.load(x_rows + offsets, mask=ok, other=0.0).to(tl.float32)
        if CENTER:
            mean = tl.sum(x, axis=1) / n
            x = tl.where(ok, x - mean[:, None], 0.0)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=1) / n + eps))
        g = tl.load(g_rows + offsets, mask=ok, other=0.0).to(tl.float32)
        acc_w += tl.sum(g * (x * rstd[:, None]), axis=0)
        if BIAS:
            acc_b += tl.sum(g, axis=0)
    if ATOMIC:
        tl.atomic_add(w_ptr + sample * stride_wb + cols, acc_w, mask=col_ok)
        if BIAS:
            tl.atomic_add(b_ptr + sample * stride_bb + cols, acc_b, mask=col_ok)
    else:
        tl.store(w_ptr + sample * stride_wb + cols, acc_w, mask=col_ok)
        if BIAS:
            tl.store(b_ptr + sample * stride_bb + cols, acc_b, mask=col_ok)


def launch_shape(batch: int, seq_len: int, n: int, n_sms: int) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_N, rows per program, programs per sample): tiles of ``TILE_ELEMENTS``, and T split
    until about 2 programs per SM, each keeping at least ``MIN_BLOCKS_PER_SPLIT`` blocks of BLOCK_T rows."""
    block_n = block_size(n, MAX_N)
    block_t = max(2, min(TILE_ELEMENTS // block_n, 1 << max(0, seq_len - 1).bit_length()))
    splits = max(1, min(cdiv(seq_len, block_t * MIN_BLOCKS_PER_SPLIT), cdiv(2 * n_sms, max(1, batch))))
    t_chunk = cdiv(cdiv(max(1, seq_len), splits), block_t) * block_t
    return block_t, block_n, t_chunk, max(1, cdiv(seq_len, t_chunk))


def affine_norm_grads_triton(
    x: torch.Tensor, g: torch.Tensor, *, eps: float, center: bool, with_bias: bool = True,
    weight_out: Optional[torch.Tensor] = None, bias_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Triton (W, β) for x, g: [B, T, n] (fp32, bf16 or fp16; n ≤ ``MAX_N``) → float32 [B, n] each (β None
    without ``with_bias``), written into ``weight_out`` / ``bias_out`` when given (float32 [B, n] with
    contiguous rows, e.g. arena slots; the sample stride is free)."""
    _check(x, g)
    batch, seq_len, n = x.shape
    if n > MAX_N:
        raise ValueError(f"the kernel holds rows of at most {MAX_N} elements, got n = {n}; use the reference")
    x, g = x.contiguous(), g.contiguous()
    weight_out = _output(weight_out, batch, n, x.device)
    bias_out = _output(bias_out, batch, n, x.device) if with_bias else None
    if batch == 0 or n == 0:
        return weight_out, bias_out
    block_t, block_n, t_chunk, splits = launch_shape(batch, seq_len, n, multiprocessor_count(x.device))
    atomic = splits > 1
    if atomic or seq_len == 0:  # split programs add into zeros; no rows: the gradients are zero
        weight_out.zero_()
        if bias_out is not None:
            bias_out.zero_()
        if seq_len == 0:
            return weight_out, bias_out
    bias_arg = bias_out if bias_out is not None else weight_out
    _affine_norm_grads_kernel[(batch, splits)](
        x, g, weight_out, bias_arg, seq_len, n, t_chunk, x.stride(0), g.stride(0), weight_out.stride(0), bias_arg.stride(0),
        float(eps), CENTER=center, BIAS=with_bias, ATOMIC=atomic, BLOCK_T=block_t, BLOCK_N=block_n,
        num_warps=8 if block_n >= 2048 else 4,
    )  # fmt: skip
    return weight_out, bias_out


def affine_norm_grads_reference(
    x: torch.Tensor, g: torch.Tensor, *, eps: float, center: bool, with_bias: bool = True,
    weight_out: Optional[torch.Tensor] = None, bias_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """PyTorch reference: x̂ by ``F.layer_norm`` / ``F.rms_norm`` in float32 (float64 for float64 inputs),
    then Σ_t g ⊙ x̂ and Σ_t g → [B, n] each, written into the outputs when given."""
    _check(x, g)
    acc = accumulation_dtype(x, g)
    x, g = x.to(acc), g.to(acc)
    shape = (x.shape[-1],)
    x_hat = F.layer_norm(x, shape, eps=eps) if center else F.rms_norm(x, shape, eps=eps)
    weight = torch.sum(g * x_hat, dim=1, out=weight_out)
    bias = torch.sum(g, dim=1, out=bias_out) if with_bias else None
    return weight, bias


def affine_norm_grads(
    x: torch.Tensor, g: torch.Tensor, *, eps: float, center: bool, with_bias: bool = True,
    weight_out: Optional[torch.Tensor] = None, bias_out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-sample (W, β) of a LayerNorm (``center``) or RMSNorm over the last dim of x, g: [B, T, n].

    `affine_norm_grads_triton` on CUDA (and with ``backend="triton"``) for n ≤ ``MAX_N`` and float32
    outputs with contiguous rows, else `affine_norm_grads_reference` (other devices, ``backend="torch"``;
    float64 stays float64). ``backend``: see `use_triton`; a forced
    ``"triton"`` raises where the kernel does not apply (n > ``MAX_N``, other outputs).
    """
    kwargs = dict(eps=eps, center=center, with_bias=with_bias, weight_out=weight_out, bias_out=bias_out)
    if use_triton(resolve_backend(backend), x, g, name="affine_norm_grads",
                  unsupported=lambda: _unsupported(x.shape[-1], weight_out, bias_out)):
        return affine_norm_grads_triton(x, g, **kwargs)
    return affine_norm_grads_reference(x, g, **kwargs)


def _unsupported(n: int, *outs: Optional[torch.Tensor]) -> Optional[str]:
    """Why the kernel cannot compute rows of n elements into ``outs`` (None when it can): it holds rows of at most
    ``MAX_N`` elements and writes absent outputs or float32 ones with contiguous rows."""
    if n > MAX_N:
        return f"holds rows of at most MAX_N = {MAX_N} elements, got n = {n}"
    for o in outs:
        if o is not None and (o.dtype != torch.float32 or o.stride(-1) != 1):
            return f"writes float32 outputs with contiguous rows, got a {o.dtype} output with strides {o.stride()}"
    return None


def _output(out: Optional[torch.Tensor], batch: int, n: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(batch, n, dtype=torch.float32, device=device)
    if tuple(out.shape) != (batch, n) or out.dtype != torch.float32 or out.device != device or out.stride(-1) != 1:
        raise ValueError(
            f"outputs must be float32 [{batch}, {n}] tensors on {device} with contiguous rows; "
            f"got {out.dtype} {list(out.shape)} with strides {out.stride()} on {out.device}"
        )
    return out


def _check(x: torch.Tensor, g: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape != g.shape or x.device != g.device:
        raise ValueError(
            f"expected x and g: [B, T, n] of one shape on one device; got {tuple(x.shape)} on {x.device} "
            f"and {tuple(g.shape)} on {g.device}"
        )
