"""DP optimizers of the clipping modes: Opacus's fast-gradient-clipping family, reused as is.

The grad-sample module leaves Σ_b c_b ∇ℓ_b in ``p.grad``; ``step()`` adds Gaussian noise with std
σ·C once per parameter element, divides by the expected batch size for ``loss_reduction="mean"``,
and steps the wrapped optimizer — Opacus's own code path, with ``generator`` and ``secure_mode``.
"""

from opacus.optimizers import (
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)

__all__ = [
    "DPOptimizerFastGradientClipping",
    "DistributedDPOptimizerFastGradientClipping",
    "FSDPOptimizerFastGradientClipping",
]
