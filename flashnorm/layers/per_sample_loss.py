"""The criterion of a model whose forward returns its per-sample losses (a model ending in
`FusedLinearCrossEntropy`)."""

from __future__ import annotations

import torch
import torch.nn as nn


class PerSampleLoss(nn.Module):
    """``criterion(losses)`` for per-sample losses ℓ [B] the model computed itself: ℓ as it is with
    ``reduction="none"`` (what the DP criterion asks for), its mean or sum otherwise.

    Example:
        >>> model, optimizer, criterion, loader = engine.make_private(
        ...     module=fused_causal_lm(hf_model), optimizer=optimizer, criterion=PerSampleLoss(), ...)
        >>> criterion(model(input_ids=ids, labels=labels)).backward()
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction={reduction!r} is not one of none, mean, sum")
        self.reduction = reduction

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        if losses.dim() != 1:
            raise ValueError(f"PerSampleLoss takes the per-sample losses [B]; got a tensor of shape {tuple(losses.shape)}")
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()
