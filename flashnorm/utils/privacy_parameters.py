"""Validation of the two numbers a DP step's guarantee rests on: the noise multiplier σ and the bound C."""

from __future__ import annotations

import math


def check_privacy_parameters(noise_multiplier, max_grad_norm) -> None:
    """Raises ``ValueError`` unless σ is a finite number ≥ 0 and C a finite number > 0.

    C = inf disables clipping and a negative or NaN σ adds no noise: either voids the guarantee silently.
    """
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not (
        math.isfinite(noise_multiplier) and noise_multiplier >= 0
    ):
        raise ValueError(f"noise_multiplier={noise_multiplier!r}: it must be a finite number >= 0.")
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not (
        math.isfinite(max_grad_norm) and max_grad_norm > 0
    ):
        raise ValueError(
            f"max_grad_norm={max_grad_norm!r}: FlashNorm's clipping modes need one finite number > 0 (flat "
            "clipping); per-layer bounds need grad_sample_mode='hooks'."
        )
