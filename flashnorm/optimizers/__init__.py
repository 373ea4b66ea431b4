"""DP optimizers of the clipping modes.

The grad-sample module leaves Σ_b c_b ∇ℓ_b in ``p.grad``; ``step()`` adds Gaussian noise with std
σ·C once per parameter element, divides by the expected batch size for ``loss_reduction="mean"``
and steps the wrapped optimizer. :class:`DPOptimizerFastGradientClipping` is Opacus's optimizer
with a fused noise tail; the distributed ones are Opacus's.
"""

from opacus.optimizers import DistributedDPOptimizerFastGradientClipping, FSDPOptimizerFastGradientClipping

from .fast_gradient_clipping import DPOptimizerFastGradientClipping

__all__ = [
    "DPOptimizerFastGradientClipping",
    "DistributedDPOptimizerFastGradientClipping",
    "FSDPOptimizerFastGradientClipping",
]
