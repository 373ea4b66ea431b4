"""Fallback for trainable layers without a FlashNorm rule: per-sample gradients for that layer only.

Uses Opacus's registered grad sampler for the layer type when there is one, else functorch
(``torch.func``) over the whole layer, its children included. Costs B·|θ| memory for that
layer; its gradient is never dropped.
"""

from __future__ import annotations

import torch.nn as nn
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer

from .registry import NormRule


class PerSampleGradFallback(NormRule):
    """Per-sample gradients of one layer from Opacus (grad sampler or functorch)."""

    methods = ("per_sample",)

    def __init__(self, layer: nn.Module, *, batch_first: bool = True):
        self.sampler = GradSampleModule.GRAD_SAMPLERS.get(type(layer))
        self.covers_children = self.sampler is None
        if self.covers_children:
            # Our activations and backprops are always batch first (rearranged by the hooks).
            prepare_layer(layer, batch_first=True)

    def per_sample_grads(self, layer, x, g, out=None, *, backend=None):  # new tensors: the caller copies them where it keeps them
        if self.sampler is not None:
            grads = self.sampler(layer, [x], g)
        else:
            grads = ft_compute_per_sample_gradient(layer, [x], g)
        return {p: gs for p, gs in grads.items() if p.requires_grad}
