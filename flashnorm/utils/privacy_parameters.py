"""The two numbers a DP step's guarantee rests on, the noise multiplier σ and the bound C: one owner, one check."""

from __future__ import annotations

import math


class PrivacyParameters:
    """σ and C of a DP training run, shared by reference by the DP optimizer (its owner) and the grad-sample module.

    The optimizer's ``noise_multiplier`` and ``max_grad_norm`` read and write these attributes (Opacus's noise and
    clipping schedulers change them between steps), and the grad-sample module reads C from here when it clips, so
    the coefficient and the noise use the same C. Values are checked where they are used (:meth:`check`), so a
    scheduler that sets an invalid one makes the next step fail before any parameter changes.

    Args:
        noise_multiplier: σ (a finite number ≥ 0).
        max_grad_norm: C (a finite number > 0).

    Raises:
        ValueError: an invalid σ or C (see :meth:`check`).
    """

    def __init__(self, noise_multiplier: float, max_grad_norm: float):
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.check()

    def check(self) -> None:
        """Raises ``ValueError`` unless σ is a finite number ≥ 0 and C a finite number > 0.

        C = inf disables clipping and a negative or NaN σ adds no noise: either voids the guarantee silently.
        """
        sigma, clip = self.noise_multiplier, self.max_grad_norm
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_multiplier={sigma!r}: it must be a finite number >= 0.")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 0):
            raise ValueError(
                f"max_grad_norm={clip!r}: FlashNorm's clipping modes need one finite number > 0 (flat "
                "clipping); per-layer bounds need grad_sample_mode='hooks'."
            )

    def clip_bound(self) -> float:
        """C, checked (with σ) as it is about to be used."""
        self.check()
        return float(self.max_grad_norm)

    def __repr__(self) -> str:
        return f"PrivacyParameters(noise_multiplier={self.noise_multiplier!r}, max_grad_norm={self.max_grad_norm!r})"



def privacy_attribute(name: str, doc: str) -> property:
    """A property reading and writing attribute ``name`` of the owner's ``privacy`` (:class:`PrivacyParameters`)."""

    def get(self):
        return getattr(self.privacy, name)

    def set_(self, value) -> None:
        setattr(self.privacy, name, value)

    return property(get, set_, doc=doc)
