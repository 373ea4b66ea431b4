"""DP optimizers of the clipping modes.

The grad-sample module leaves Σ_b c_b ∇ℓ_b in ``p.grad``; ``step()`` adds Gaussian noise with std
σ·C once per parameter element, divides by the expected batch size for ``loss_reduction="mean"``
and steps the wrapped optimizer. `DPOptimizerFastGradientClipping` is Opacus's optimizer
with a fused noise tail; its distributed siblings (subclasses of it) make a step on W ranks equal the
single-process step on the union of their batches, with the noise added once across the world:
`DistributedDPOptimizerFastGradientClipping` for DDP (rank 0 adds the noise before one SUM
all-reduce) and `FSDPOptimizerFastGradientClipping` for FSDP2 (each element's owner adds it).
"""

from .distributed import DistributedDPOptimizerFastGradientClipping
from .fast_gradient_clipping import DPOptimizerFastGradientClipping
from .fsdp import FSDPOptimizerFastGradientClipping

__all__ = [
    "DPOptimizerFastGradientClipping",
    "DistributedDPOptimizerFastGradientClipping",
    "FSDPOptimizerFastGradientClipping",
]
