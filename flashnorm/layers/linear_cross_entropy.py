"""A linear head and its cross-entropy fused: per-sample losses [B] without a T × V logit tensor, and the head's
per-sample gradient terms block by block of the vocabulary.

Notation: sample b has hidden states X_b ∈ ℝ^{T×d}, targets y_b ∈ ℤ^T and token weights α_b ∈ ℝ^T (0 where the
target is ``ignore_index``; 1/n_b with n_b the sample's valid tokens for ``token_reduction="mean"``, 1 for
``"sum"``); the head is W ∈ ℝ^{V×d} with optional bias b ∈ ℝ^V, label smoothing ε. The loss is

    ℓ_b = Σ_t α_bt·(lse_bt − (1 − ε)·z_bt,y − (ε/V)·Σ_v z_btv),   z_bt = W x_bt + b,

and its gradient with respect to the logits is G_b = α_b ⊙ (softmax(Z_b) − (1 − ε)·onehot(y_b) − ε/V) ∈ ℝ^{T×V}.
For a vocabulary block J (rows J of W), G_b's columns J need only the rows' lse, known after the forward pass:

* the input gradient X̄ = Σ_J G_J W_J (float32 accumulation over the blocks);
* the head's per-sample squared norm ‖G_bᵀX_b‖² = Σ_J ‖G_b,Jᵀ X_b‖²: each block's V_J × d piece of the per-sample
  weight gradient is exact and the pieces are disjoint rows, so their squared norms add; the bias's
  ‖Σ_t G_b[t]‖² = Σ_J ‖Σ_t G_b,J[t]‖² likewise;
* the clipped gradient Σ_b c_b G_b,Jᵀ X_b, once the coefficients are known (c applied in float32 to exact
  per-sample products, `clipped_weight_grad`);
* with a tied input embedding (ids_b ∈ ℤ^{T'}, its output gradient Ē_b ∈ ℝ^{T'×d}), the cross term
  ⟨G_bᵀX_b, onehot(ids_b)ᵀĒ_b⟩ = Σ_s ⟨(G_bᵀX_b)[ids_bs], ē_bs⟩ = Σ_J Σ_{s: ids_bs ∈ J} ⟨(G_b,JᵀX_b)[ids_bs], ē_bs⟩.

Every consumer takes G from the same tiles (`tile_pass`, one `HeadTiling` per call), so what a clipping
step measures is what it applies. Memory: G's tile (samples × T × V_J, at most about the hidden states' size) and
V_J × d, never T × V. Cost per pass over the vocabulary: 2·B·T·V·d FLOPs per GEMM (the logits, then X̄, the norms,
the clipped gradient: one more each).

`FusedLinearCrossEntropy` is the module (its norm rule: `flashnorm.norms.linear_cross_entropy`; its
``logit_losses`` the same loss from logits formed elsewhere); `fused_linear_cross_entropy` the functional form for
non-private use.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ..kernels import clipped_bias_grad, clipped_weight_grad, flash_norm_sq
from ..kernels.accumulation import MAX_CHUNK_ELEMENTS, accumulation_dtype
from ..kernels.backend import resolve_backend
from ..kernels.linear_cross_entropy import logit_grad_block, logit_row_stats, logit_stats

#: Token reductions of a sample's loss (Opacus's per-sequence semantics for ``loss_reduction="mean"``/``"sum"``).
TOKEN_REDUCTIONS = ("mean", "sum")
#: Vocabulary blocks are multiples of this many rows of W (the kernels' tile) unless the vocabulary is smaller.
BLOCK_MULTIPLE = 128
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# One call's record and its tiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadTiling:
    """G's tiles: ``samples`` whole samples (rows) × ``vocab_block`` vocabulary columns, the last of each smaller."""

    samples: int
    vocab_block: int


def head_tiling(batch: int, steps: int, vocab: int, d: int, vocab_block: Optional[int] = None) -> HeadTiling:
    """The tiles of a call on [batch, steps, d] hidden states and a vocabulary of ``vocab``.

    A tile holds at most max(``MAX_CHUNK_ELEMENTS``, 2·B·T·d) elements (twice the hidden states: memory O(T·d)), or
    one sample's T rows of ``BLOCK_MULTIPLE`` columns where that is more, as do the per-sample products of a block
    (samples × V_J × d, for the tied cross term); V_J is a multiple of ``BLOCK_MULTIPLE`` (or the whole vocabulary),
    ``vocab_block`` when given (tests force small blocks).
    """
    budget = max(MAX_CHUNK_ELEMENTS, 2 * batch * steps * d)
    if vocab_block is None:
        vocab_block = max(BLOCK_MULTIPLE, budget // max(1, steps) // BLOCK_MULTIPLE * BLOCK_MULTIPLE)
    vocab_block = max(1, min(vocab, vocab_block))
    samples = max(1, min(batch, budget // max(1, steps * vocab_block), budget // max(1, vocab_block * d)))
    return HeadTiling(samples, vocab_block)


@dataclass(eq=False)
class HeadCall:
    """What one call of the head keeps for its backward passes (a few floats per row; X and W are the caller's).

    Attributes:
        targets: y [B·T] int64 (``ignore_index`` where ignored).
        alpha: α [B·T] in the accumulation dtype (0 where ignored).
        keep, spread: 1 − ε and ε/V.
        steps: T.
        dtype: the compute dtype of X and W (autocast's, when on).
        tiling: G's tiles.
        backend: the kernels' backend (resolved).
        input_requires_grad: the hidden states required grad (else no pass computes X̄).
        lse: [B·T] in the accumulation dtype, set by the forward pass.
        row_norm_sq: ‖G_t‖² per row [B·T] of the G the passes form (before any coefficient), set by a norm pass
            (the rounding allowance's scale).
    """

    targets: torch.Tensor
    alpha: torch.Tensor
    keep: float
    spread: float
    steps: int
    dtype: torch.dtype
    tiling: HeadTiling
    backend: str
    input_requires_grad: bool
    lse: Optional[torch.Tensor] = None
    row_norm_sq: Optional[torch.Tensor] = None
    _input_grad: Optional[tuple] = field(default=None, repr=False)

    def keep_input_grad(self, grad: torch.Tensor, input_grad: torch.Tensor) -> None:
        """Keeps X̄ computed for the loss gradient ``grad`` (by a norm pass) for the backward that follows it (and
        ``grad`` itself, so that no other tensor takes its memory meanwhile)."""
        self._input_grad = (grad, _identity(grad), input_grad)

    def take_input_grad(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """X̄ kept for exactly this ``grad`` (the same memory, unchanged since), once; else ``None``."""
        kept, self._input_grad = self._input_grad, None
        return kept[2] if kept is not None and kept[1] == _identity(grad) else None


def _identity(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype


# ---------------------------------------------------------------------------------------------
# The block algorithms
# ---------------------------------------------------------------------------------------------


_FLOAT32_OUTPUT = [True]  # cuBLAS takes out_dtype here (cleared, with a warning, where this torch has none)


def _matmul_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D or batched) in the accumulation dtype: 16-bit CUDA operands through cuBLAS with a float32
    output (products exact, float32 sums, never rounded to 16 bits), anything else in the accumulation dtype."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in _SIXTEEN_BIT and _FLOAT32_OUTPUT[0]:
        try:
            return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError) as err:
            _FLOAT32_OUTPUT[0] = False
            warnings.warn(f"torch.mm(..., out_dtype=torch.float32) is not available ({err}): the fused head's "
                          "16-bit products run in float32 instead (exact, slower).")
    acc = accumulation_dtype(a, b)
    return a.to(acc) @ b.to(acc)


def _weighted_products(x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, backend: str) -> torch.Tensor:
    """Σ_b coef_b G_bᵀX_b for x: [k, T, d], g: [k, T, V_J] → [V_J, d] in the accumulation dtype (coef applied in
    float32 or float64 to the exact product: one GEMM and a scaling for one sample, else the clipped-gradient
    kernel)."""
    if x.shape[0] == 1:
        product = _matmul_acc(g[0].T, x[0])
        return product.mul_(coef[0].to(product.dtype))
    return clipped_weight_grad(x, g, coef, backend=backend)


@dataclass
class TilePass:
    """What `tile_pass` computed (``None`` where not asked). Per-sample terms include coef_b (squared for the
    norms), as the gradient of Σ_b coef_b ℓ_b has them."""

    input_grad: Optional[torch.Tensor] = None  # X̄ [B, T, d], accumulation dtype
    norm_sq: Optional[torch.Tensor] = None  # [B]
    row_norm_sq: Optional[torch.Tensor] = None  # ‖G_t‖² [B·T], without coef
    weight_grad: Optional[torch.Tensor] = None  # Σ_b coef_b ∇_W ℓ_b: [V, d] in W's dtype
    bias_grad: Optional[torch.Tensor] = None  # [V] in the bias's dtype
    per_sample: Dict[str, torch.Tensor] = field(default_factory=dict)  # "weight": [B, V, d], "bias": [B, V]
    cross: Optional[torch.Tensor] = None  # [B]
    cross_magnitude: Optional[torch.Tensor] = None  # [B]: Σ_s ‖coef_b (G_bᵀX_b)[ids_bs]‖·‖ē_bs‖, its sums' scale


def _no_autocast(fn):
    """Runs ``fn`` with autocast off on its first argument's device: the head chose its compute dtype already and
    its sums stay in the accumulation dtype."""

    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return run


@_no_autocast
def tile_pass(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], call: HeadCall, coef: torch.Tensor, *,
    input_grad: bool = False, weight_norm: bool = False, bias_norm: bool = False, row_norms: bool = False,
    weight_grad: bool = False,
    bias_grad: bool = False, per_sample: bool = False, embedding: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    weight_dtype: Optional[torch.dtype] = None, bias_dtype: Optional[torch.dtype] = None,
) -> TilePass:
    """One pass over G's tiles for the gradient of Σ_b coef_b ℓ_b, computing what is asked.

    Args:
        x: X [B, T, d] in the call's compute dtype; weight: W [V, d] and bias [V] (or None) in it too.
        coef: [B] (the loss gradient; c ⊙ it when clipped), applied in the accumulation dtype after G.
        input_grad: X̄ = Σ_J G_J W_J, rows scaled by coef.
        weight_norm, bias_norm: Σ_J ‖G_b,JᵀX_b‖², Σ_J ‖Σ_t G_b,J[t]‖², times coef_b².
        row_norms: ‖G_t‖² per row, of G as formed (without coef).
        weight_grad, bias_grad: Σ_b coef_b G_bᵀX_b, Σ_b coef_b Σ_t G_b[t] (cast to ``weight_dtype``, ``bias_dtype``).
        per_sample: coef_b G_bᵀX_b [B, V, d] and coef_b Σ_t G_b[t] [B, V] (B·V·d memory).
        embedding: (ids [B, T'], Ē [B, T', d] in the accumulation dtype) of a tied input embedding: the cross term
            coef_b Σ_s ⟨(G_bᵀX_b)[ids_bs], ē_bs⟩, and the scale of its dot products' rounding,
            |coef_b| Σ_s ‖(G_bᵀX_b)[ids_bs]‖·‖ē_bs‖.
    """
    batch, steps, d = x.shape
    vocab = weight.shape[0]
    acc = accumulation_dtype(x, weight)
    out = TilePass()
    if not (input_grad or weight_norm or bias_norm or row_norms or weight_grad or bias_grad or per_sample
            or embedding is not None):
        return out
    x2 = x.reshape(batch * steps, d)
    coef = coef.to(acc)
    backend, samples, block = call.backend, call.tiling.samples, call.tiling.vocab_block
    if input_grad:
        out.input_grad = torch.zeros(batch * steps, d, dtype=acc, device=x.device)
    if weight_norm or bias_norm:
        out.norm_sq = torch.zeros(batch, dtype=acc, device=x.device)
    if row_norms:
        out.row_norm_sq = torch.zeros(batch * steps, dtype=acc, device=x.device)
    if weight_grad:
        out.weight_grad = torch.empty(vocab, d, dtype=weight_dtype or weight.dtype, device=x.device)
    if bias_grad:
        out.bias_grad = torch.empty(vocab, dtype=bias_dtype or bias.dtype, device=x.device)
    if per_sample:
        out.per_sample["weight"] = torch.empty(batch, vocab, d, dtype=acc, device=x.device)
        if bias is not None:
            out.per_sample["bias"] = torch.empty(batch, vocab, dtype=acc, device=x.device)
    if embedding is not None:
        out.cross = torch.zeros(batch, dtype=acc, device=x.device)
        out.cross_magnitude = torch.zeros(batch, dtype=acc, device=x.device)
        e_norms = torch.linalg.vector_norm(embedding[1], dim=-1)  # ‖ē_bs‖ [B, T']

    for v0 in range(0, vocab, block):
        v1 = min(vocab, v0 + block)
        w_block = weight[v0:v1]
        block_weight = block_bias = None
        for b0 in range(0, batch, samples):
            b1 = min(batch, b0 + samples)
            g = logit_grad_block(x2, b0 * steps, b1 * steps, weight, bias, v0, v1, call.lse, call.targets,
                                 call.alpha, call.keep, call.spread, backend=backend)
            g3, xs, c = g.view(b1 - b0, steps, v1 - v0), x[b0:b1], coef[b0:b1]
            if input_grad:
                out.input_grad[b0 * steps:b1 * steps] += _matmul_acc(g, w_block)
            if row_norms:
                out.row_norm_sq[b0 * steps:b1 * steps] += torch.linalg.vector_norm(g, dim=1, dtype=acc).square()
            if weight_norm:
                out.norm_sq[b0:b1] += flash_norm_sq(xs, g3, backend=backend).to(acc) * c.square()
            if bias_norm or bias_grad or (per_sample and bias is not None):
                column_sums = g3.sum(dim=1, dtype=acc)  # β_b,J = Σ_t G_b,J[t]: [k, V_J]
                if bias_norm:
                    out.norm_sq[b0:b1] += column_sums.square().sum(dim=1) * c.square()
                if per_sample:
                    out.per_sample["bias"][b0:b1, v0:v1] = column_sums * c.unsqueeze(1)
            if weight_grad:
                product = _weighted_products(xs, g3, c, backend)
                block_weight = product if block_weight is None else block_weight.add_(product)
            if bias_grad:
                product = clipped_bias_grad(g3, c).to(acc)
                block_bias = product if block_bias is None else block_bias.add_(product)
            if per_sample or embedding is not None:
                products = _matmul_acc(g3.transpose(1, 2), xs)  # G_b,JᵀX_b: [k, V_J, d]
                if per_sample:
                    out.per_sample["weight"][b0:b1, v0:v1] = products * c.view(-1, 1, 1)
                if embedding is not None:
                    dots, magnitude = _block_cross(products, embedding[0][b0:b1] - v0, embedding[1][b0:b1],
                                                   e_norms[b0:b1])
                    out.cross[b0:b1] += dots * c
                    out.cross_magnitude[b0:b1] += magnitude * c.abs()
        if weight_grad:
            out.weight_grad[v0:v1] = block_weight
        if bias_grad:
            out.bias_grad[v0:v1] = block_bias
    if input_grad:
        out.input_grad = out.input_grad.view(batch, steps, d).mul_(coef.view(-1, 1, 1))
    return out


def _block_cross(products: torch.Tensor, local_ids: torch.Tensor, e: torch.Tensor,
                 e_norms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{s: 0 ≤ local_ids_bs < V_J} ⟨products_b[local_ids_bs], e_bs⟩, the same sum of ‖products_b[local_ids_bs]‖·
    ‖e_bs‖) for products: [k, V_J, d], local_ids: [k, T'] (ids less the block's first), e: [k, T', d] and its rows'
    norms e_norms: [k, T'] → [k] each."""
    width, d = products.shape[1], products.shape[2]
    inside = (local_ids >= 0) & (local_ids < width)
    rows = products.gather(1, local_ids.clamp(0, width - 1).unsqueeze(-1).expand(-1, -1, d))  # [k, T', d]
    dots = (rows * e).sum(dim=-1)
    magnitudes = torch.linalg.vector_norm(rows, dim=-1) * e_norms
    zeros = torch.zeros_like(dots)
    return torch.where(inside, dots, zeros).sum(dim=1), torch.where(inside, magnitudes, zeros).sum(dim=1)


@_no_autocast
def head_losses(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], call: HeadCall) -> torch.Tensor:
    """ℓ_b [B] (accumulation dtype) for X [B, T, d]; sets ``call.lse``. One pass of `logit_stats` per vocabulary
    block, the blocks combined by log-add-exp."""
    batch, steps, d = x.shape
    vocab = weight.shape[0]
    x2 = x.reshape(batch * steps, d)
    lse = z_y = z_sum = None
    for v0 in range(0, vocab, call.tiling.vocab_block):
        v1 = min(vocab, v0 + call.tiling.vocab_block)
        block = logit_stats(x2, weight, bias, call.targets, v0, v1, backend=call.backend)
        if lse is None:
            lse, z_y, z_sum = block
        else:
            lse, z_y, z_sum = torch.logaddexp(lse, block[0]), z_y + block[1], z_sum + block[2]
    call.lse = lse
    return token_losses(lse, z_y, z_sum, call.alpha, call.keep, call.spread, steps)


def token_losses(lse: torch.Tensor, z_y: torch.Tensor, z_sum: torch.Tensor, alpha: torch.Tensor, keep: float,
                 spread: float, steps: int) -> torch.Tensor:
    """ℓ_b = Σ_t α_bt·(lse_bt − keep·z_bt,y − spread·Σ_v z_btv) [B] from the logits' row statistics [B·T] (keep =
    1 − ε, spread = ε/V): the loss's one formula, for the fused head and for logits formed elsewhere."""
    token = lse - keep * z_y - spread * z_sum
    token = torch.where(alpha != 0, token, torch.zeros_like(token))  # ignored rows: 0 whatever their logits
    return (alpha * token).view(-1, steps).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# Autograd function, functional form and module
# ---------------------------------------------------------------------------------------------


def _will_run(ctx, index: int) -> bool:
    """Whether this backward pass needs the gradient of input ``index``: it requires grad and the engine will run
    its node (a norm pass asks for the layers' taps alone: the weight's accumulator then does not run)."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # a leaf asked for by torch.autograd.grad itself: needed
        return True


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(X [B, T, d], W [V, d], b [V] or None, `HeadCall`) → ℓ [B]. The backward computes, in one
    `tile_pass`, the gradients this pass needs: X̄ (unless a norm pass kept it for this very loss gradient),
    ∇W and ∇b (only where their accumulators run)."""

    @staticmethod
    def forward(ctx, x, weight, bias, call):
        ctx.call = call
        ctx.save_for_backward(x, weight, bias)
        return head_losses(x, weight, bias, call)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        call = ctx.call
        want_x, want_w = _will_run(ctx, 0), _will_run(ctx, 1)
        want_b = bias is not None and _will_run(ctx, 2)
        kept = call.take_input_grad(grad) if want_x else None
        out = tile_pass(x, weight, bias, call, grad, input_grad=want_x and kept is None, weight_grad=want_w,
                        bias_grad=want_b)
        dx = kept if kept is not None else out.input_grad
        return (dx.to(x.dtype) if want_x else None), out.weight_grad, out.bias_grad, None


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _rows(hidden: torch.Tensor, target: torch.Tensor, shift: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(X [B, T, d], targets [B, T]) from hidden [B, T, d] or [B, d] and target [B, T] or [B]."""
    if hidden.dim() == 2:
        if shift:
            raise ValueError("shift=True needs sequences: hidden [B, T, d] and target [B, T]")
        hidden, target = hidden.unsqueeze(1), target.unsqueeze(1) if target.dim() == 1 else target
    if hidden.dim() != 3 or target.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden [B, T, d] with target [B, T] (or [B, d] with [B]); got {tuple(hidden.shape)} and "
            f"{tuple(target.shape)}"
        )
    return hidden, target


def _check_options(token_reduction: str, label_smoothing: float) -> None:
    if token_reduction not in TOKEN_REDUCTIONS:
        raise ValueError(f"token_reduction={token_reduction!r} is not one of {', '.join(TOKEN_REDUCTIONS)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1]")


def token_weights(target: torch.Tensor, vocab: int, acc: torch.dtype, *, ignore_index: int, shift: bool,
                  token_reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [B·T] int64, α [B·T] in ``acc``) for target [B, T]: shifted (position t scored on target[t + 1], the last
    on nothing) when ``shift``; α = 0 where y is ``ignore_index``, else 1/n_b (``"mean"``, n_b the sample's scored
    positions) or 1 (``"sum"``).

    Raises:
        ValueError: a target outside [0, V) that is not ``ignore_index`` (read on the host; not while a CUDA graph
            is captured).
    """
    target = target.long()
    if shift:
        target = torch.nn.functional.pad(target[:, 1:], (0, 1), value=ignore_index)
    valid = target != ignore_index
    if not (target.is_cuda and torch.cuda.is_current_stream_capturing()):
        bad = valid & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            raise ValueError(f"a target lies outside [0, {vocab}) and is not ignore_index={ignore_index}: "
                             f"{int(target[bad][0])}")
    alpha = valid.to(acc)
    if token_reduction == "mean":
        alpha = alpha / alpha.sum(dim=1, keepdim=True).clamp(min=1)
    return target.reshape(-1), alpha.reshape(-1)


def prepare_call(hidden, weight, bias, target, *, ignore_index=-100, shift=False, token_reduction="mean",
                 label_smoothing=0.0, vocab_block=None, backend=None):
    """(X [B, T, d], W, b, `HeadCall`): the operands in the compute dtype (autocast's when it is on) and the
    call's record (targets and token weights: `token_weights`).

    Raises:
        ValueError: shapes, options, a target outside [0, V) that is not ``ignore_index``.
        TypeError: X and W of different dtypes.
    """
    _check_options(token_reduction, label_smoothing)
    x, target = _rows(hidden, target, shift)
    cast = _autocast_dtype(x.device)
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
    if x.dtype != weight.dtype:
        raise TypeError(f"hidden states are {x.dtype} but the head's weight is {weight.dtype}; use one dtype (or autocast)")
    batch, steps, d = x.shape
    vocab = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"the head's weight is {tuple(weight.shape)} but the hidden size is {d}")
    targets, alpha = token_weights(target, vocab, accumulation_dtype(x, weight), ignore_index=ignore_index,
                                   shift=shift, token_reduction=token_reduction)
    call = HeadCall(
        targets=targets, alpha=alpha, keep=1.0 - label_smoothing,
        spread=label_smoothing / vocab, steps=steps, dtype=x.dtype,
        tiling=head_tiling(batch, steps, vocab, d, vocab_block), backend=resolve_backend(backend),
        input_requires_grad=hidden.requires_grad,
    )
    return x, weight, bias, call


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, **options) -> torch.Tensor:
    """Per-sample losses ℓ [B] of the head (W, b) on hidden [B, T, d] (or [B, d]) with targets [B, T] (or [B]),
    logits never materialised. ``options``: those of `FusedLinearCrossEntropy`. For non-private use (or
    inside a module that is not wrapped): in a model made private, use the module, whose norm rule the clipping
    step knows."""
    x, weight, bias, call = prepare_call(hidden, weight, bias, target, **options)
    return LinearCrossEntropyFunction.apply(x, weight, bias, call)


class FusedLinearCrossEntropy(nn.Module):
    """Cross-entropy of a linear head, per sample: ``loss = head(hidden, target)`` → ℓ [B] (float32, float64 for
    float64), never a [B, T, V] logit tensor. In a model made private with FlashNorm it takes part in every clipping
    mode (`flashnorm.norms.linear_cross_entropy`).

    Args:
        weight: W [V, d] (e.g. ``lm_head.weight``, tied or not: the very Parameter, registered here too).
        bias: b [V] or None.
        ignore_index: targets to leave out (their rows get α = 0).
        shift: score position t on target[t + 1] (causal LM labels aligned with the inputs, as Hugging Face's).
        token_reduction: ``"mean"`` over the sample's valid tokens (0 for a sample with none) or ``"sum"``: Opacus's
            per-sequence loss for ``loss_reduction="mean"`` / ``"sum"`` with ``shape=(B, T, V)``.
        label_smoothing: ε, as ``nn.CrossEntropyLoss``'s.
        vocab_block: rows of W per block (default: from the memory budget, `head_tiling`).
        backend: the kernels' backend (``"auto"``, ``"triton"``, ``"torch"``; None: ``FLASHNORM_BACKEND``).

    Example:
        >>> head = FusedLinearCrossEntropy.from_linear(model.lm_head, shift=True)
        >>> losses = head(hidden_states, input_ids)   # [B]
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter] = None, *, ignore_index: int = -100,
                 shift: bool = False, token_reduction: str = "mean", label_smoothing: float = 0.0,
                 vocab_block: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        _check_options(token_reduction, label_smoothing)
        self.weight = weight
        self.bias = bias
        self.ignore_index = ignore_index
        self.shift = shift
        self.token_reduction = token_reduction
        self.label_smoothing = label_smoothing
        self.vocab_block = vocab_block
        self.backend = backend
        #: The record of the last call, until the norm rule takes it (`take_call`).
        self._pending_call: Optional[HeadCall] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "FusedLinearCrossEntropy":
        """The head of ``linear`` (its weight and bias, the same Parameters)."""
        return cls(linear.weight, linear.bias, **options)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, weight, bias, call = prepare_call(
            hidden, self.weight, self.bias, target, ignore_index=self.ignore_index, shift=self.shift,
            token_reduction=self.token_reduction, label_smoothing=self.label_smoothing,
            vocab_block=self.vocab_block, backend=self.backend,
        )
        self._pending_call = call
        return LinearCrossEntropyFunction.apply(x, weight, bias, call)

    def logit_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """ℓ [B] from logits [B, T, V] (or [B, V]) formed outside the head, e.g. by the ``nn.Linear`` whose weight it
        holds: the loss of `forward` by the same formula (`token_weights`, `token_losses`), in the accumulation
        dtype, differentiable through the logits by ordinary autograd (a model made private then clips through the
        Linear's own rule). For small batches, where the logits cost less than the head's extra pass."""
        z, target = _rows(logits, target, self.shift)
        batch, steps, vocab = z.shape
        acc = accumulation_dtype(z)
        targets, alpha = token_weights(target, vocab, acc, ignore_index=self.ignore_index, shift=self.shift,
                                       token_reduction=self.token_reduction)
        lse, z_y, z_sum = logit_row_stats(z.reshape(batch * steps, vocab).to(acc), targets)
        return token_losses(lse, z_y, z_sum, alpha, 1.0 - self.label_smoothing, self.label_smoothing / vocab, steps)

    def take_call(self) -> Optional[HeadCall]:
        """The last call's record (once): the norm rule keeps it beside the captured input."""
        call, self._pending_call = self._pending_call, None
        return call

    def extra_repr(self) -> str:
        vocab, d = self.weight.shape
        return (f"vocab={vocab}, d={d}, bias={self.bias is not None}, shift={self.shift}, "
                f"token_reduction={self.token_reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}")
