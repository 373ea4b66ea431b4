"""One backward pass with bookkeeping (``flash_fuse``).

The norm pass is the only backward pass: the layers compute input gradients and norms, no
weight gradients. Each layer keeps what its plan needs — its per-sample gradients (small layers,
or where they cost no more memory than X and G), else X and G — and after the pass the clipped
gradient of every trainable parameter is assembled: (c ⊙ G)ᵀX for Linear weights,
Σ_b c_b g_b from kept per-sample gradients (biases β_b among them). The per-sample gradients
live side by side in one :class:`~flashnorm.grad_sample.arena.PerSampleArena`, so their norms and
their clipped sum are one launch each for the whole model.
"""

from __future__ import annotations

from ..norms.registry import clipped_from_per_sample
from .base import FlashNormGradSampleModule


class GradSampleModuleFastGradientClippingFuse(FlashNormGradSampleModule):
    """One backward pass; clipped gradients assembled from the kept per-layer state."""

    passes = 1

    def _write_clipped_gradients(self, loss_per_sample, coef):
        arena, self._arena = self._arena, None
        if arena is not None:  # every per-sample gradient kept in the arena: one weighted sum
            for p, grad in arena.clipped_sum(coef).items():
                p.grad = grad if p.grad is None else p.grad.add_(grad)
        for layer in self.layers:
            kept, layer.kept = layer.kept, None
            if kept is None or kept[0] == "arena":  # not reached by this loss, an empty batch, or done above
                continue
            if kept[0] == "per_sample":
                grads = clipped_from_per_sample(kept[1], coef)
            else:
                _, x, g, with_vectors = kept
                grads = layer.rule.clipped_grads(layer.module, x, g, coef, vectors=with_vectors)
            for p, grad in grads.items():
                if grad.dtype != p.dtype:
                    grad = grad.to(p.dtype)
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad.add_(grad)
