"""One backward pass with bookkeeping (``flash_fuse``).

The norm pass is the only backward pass: the layers compute input gradients and norms, no weight
gradients. Each layer keeps what its plan needs (:mod:`~flashnorm.grad_sample.kept`): its per-sample
gradients (small layers, or where they cost no more memory than X and G), else X and G. After the pass
the clipped gradient of every trainable parameter is assembled: (c ⊙ G)ᵀX for Linear weights,
Σ_b c_b g_b from kept per-sample gradients (biases β_b among them). Packed per-sample gradients
(:class:`~flashnorm.grad_sample.packed_grads.PackedPerSampleGrads`) take one weighted sum per buffer.
"""

from __future__ import annotations

from .workflow import FlashNormGradSampleModule


class GradSampleModuleFastGradientClippingFuse(FlashNormGradSampleModule):
    """One backward pass; clipped gradients assembled from the kept per-layer state."""

    passes = 1

    def _write_clipped_gradients(self, loss_per_sample, coef):
        packed, self._packed = self._packed, None
        if packed is not None:  # every packed per-sample gradient: one weighted sum per buffer
            for p, grad in packed.clipped_sum(coef, backend=self.backend).items():
                p.grad = grad if p.grad is None else p.grad.add_(grad)
        for layer in self.layers:
            kept, layer.kept = layer.kept, None
            if kept is None:  # not reached by this loss, or an empty batch
                continue
            for p, grad in kept.clipped_grads(layer.rule, layer.module, coef, backend=self.backend).items():
                if grad.dtype != p.dtype:
                    grad = grad.to(p.dtype)
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad.add_(grad)
