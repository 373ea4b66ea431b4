"""Modules computed by FlashNorm's kernels, usable directly (private or not).

* `FusedLinearCrossEntropy` (and `fused_linear_cross_entropy`): a linear head and its cross-entropy fused,
  per-sample losses [B] without a T × V logit tensor; its norm rule makes it exact in every clipping mode.
* `PerSampleLoss`: the DP criterion's loss for a model that returns its per-sample losses itself.
"""

from .linear_cross_entropy import FusedLinearCrossEntropy, fused_linear_cross_entropy
from .per_sample_loss import PerSampleLoss

__all__ = ["FusedLinearCrossEntropy", "PerSampleLoss", "fused_linear_cross_entropy"]
