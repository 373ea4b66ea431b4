"""The rounding allowance of the clipping coefficient: how far a norm estimate and the gradient applied may differ.

A sample's gradient is a sum of terms, e.g. W_b = Σ_t g_t x_tᵀ for a Linear. FlashNorm computes its norm one way
(a flash tile, a Gram matrix) and applies c_b·W_b another way (one GEMM over the batch's rows), and both round.
Rounding a sum of n terms errs by at most γ_n·Σ_t ‖g_t‖‖x_t‖ ≤ γ_n·s_b, with s_b = ‖X_b‖_F‖G_b‖_F, whatever the
sum's value: where the terms cancel (huge inputs whose gradient nearly vanishes), that error can dwarf the
gradient itself, and the two computations can disagree by far more than C.

So each layer reports s_b (`rounding_scale`), and the clipping coefficient is

    c_b = min(1, C / ‖ĝ_b‖, (1 + τ)·C / U_b),    U_b = √(‖ĝ_b‖² + Q_b) + R_b,

where ‖ĝ_b‖² is the estimate, R_b = √(Σ_layers r²) with r = (γ_norm + γ_applied)·s the radius of both
computations' rounding, and Q_b the Gram form's error in the squared domain (γ_G·s², and the cross terms of
shared parameters). Whatever is applied then has norm ≤ (1 + τ)·C. On ordinary inputs U_b ≤ (1 + τ)·‖ĝ_b‖ and
the coefficient is exactly Opacus's; on random data (the least aligned gradients, ‖W_b‖ ≈ s_b/√T) up to
T ≈ 600 in float32 accumulation, beyond which it shrinks by 10⁻⁴ (T = 1030) to 0.3 % (T = 4096).

γ_n = λ·√n·u (Higham & Mary's probabilistic bound, λ = 8): the deterministic n·u would shrink every clipped
gradient at long sequences (n·u·√T > τ from T ≈ 600 in float32), while λ√n·u covers rounding errors that do not
all align; inputs crafted so that every rounding of a long sum goes the same way can exceed it (a limit of the
guarantee).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels.accumulation import accumulation_dtype

#: τ: the relative excess over C allowed to rounding (the guarantee is ‖applied_b‖ ≤ (1 + τ)·C).
ALLOWANCE = 1e-3
#: λ of the probabilistic bound γ_n = λ·√n·u (the chance that random roundings exceed it is ≈ 2n·e^{-λ²/2}).
CONFIDENCE = 8.0
#: Rows summed beyond a sample's own n terms: the tree of partial sums over the batch's rows (⌈log₂(B·n)⌉),
#: T-split partials, the clipping product and the cast to the parameter's dtype.
EXTRA_ROUNDINGS = 8
#: Above this many positions per sample, a Gram norm in float32 is computed in float64: its error grows with
#: T·s² against ‖W‖² ≈ s²/T, so beyond it even ordinary inputs would reach the allowance.
GRAM_FLOAT32_MAX_STEPS = 32


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of the accumulation dtype that sums a ``dtype`` product: float64 → 2⁻⁵³, anything else → float32's 2⁻²⁴."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def gamma(terms: int, batch: int, dtype: torch.dtype) -> float:
    """γ for a sum of a sample's ``terms`` products accumulated in ``dtype``'s accumulation dtype, among
    ``batch`` samples (the extra roundings of summing the batch's rows)."""
    n = terms + math.ceil(math.log2(max(2, batch * terms))) + EXTRA_ROUNDINGS
    return CONFIDENCE * math.sqrt(n) * unit_roundoff(dtype)


def gram_gamma(steps: int, d: int, p: int, dtype: torch.dtype) -> float:
    """γ_G with |⟨X_bX_bᵀ, G_bG_bᵀ⟩ computed − exact| ≤ γ_G·s_b²: the d- and p-sums of the Gram entries, then
    the T² products summed."""
    return CONFIDENCE * (math.sqrt(d) + math.sqrt(p) + steps + 1) * unit_roundoff(dtype)


def gram_in_float64(steps: int, dtype: torch.dtype) -> bool:
    """A Gram norm of these ``steps`` is computed in float64 (see `GRAM_FLOAT32_MAX_STEPS`)."""
    return dtype != torch.float64 and steps > GRAM_FLOAT32_MAX_STEPS


def frobenius_per_sample(t: torch.Tensor) -> torch.Tensor:
    """‖t_b‖_F for t: [B, ...] → [B], accumulated in float32 (float64 for float64)."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=accumulation_dtype(t))


def upper_bound(norm_sq: torch.Tensor, radius_sq: Optional[torch.Tensor], slack_sq: Optional[torch.Tensor]) -> torch.Tensor:
    """U_b = √(‖ĝ_b‖² + Q_b) + R_b: [B] (``radius_sq`` = R², ``slack_sq`` = Q; ``None`` where nothing was noted)."""
    bound = (norm_sq if slack_sq is None else norm_sq + slack_sq).sqrt()  # NaN if even the bound is negative
    return bound if radius_sq is None else bound + radius_sq.sqrt()


def clipping_coef(norm_sq: torch.Tensor, bound: Optional[torch.Tensor], max_norm: float) -> torch.Tensor:
    """c_b = min(1, C / (‖ĝ_b‖ + 10⁻⁶), (1 + τ)·C / U_b): [B] — the library's one clipping coefficient, computed on
    ``norm_sq``'s device with no host sync (a B = 1 step passes its one-element s to
    `scale_`).

    Opacus's coefficient when ``bound`` is ``None`` (the same operations as its optimizer's
    ``(max_grad_norm / (norms + 1e-6)).clamp(max=1.0)``); a negative estimate counts as 0 there, the bound then
    deciding."""
    coef = (max_norm / (norm_sq.clamp(min=0).sqrt() + 1e-6)).clamp(max=1.0)
    return coef if bound is None else torch.minimum(coef, (1.0 + ALLOWANCE) * max_norm / bound)
