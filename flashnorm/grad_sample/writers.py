"""How a step writes Σ_b c_b ∇ℓ_b into ``p.grad`` once the coefficients c are known: the mode's *writer*.

The mode table (`flashnorm.modes`) names one writer per mode:

* `SecondBackward` (``ghost``, ``flash``): back-propagates Σ_b c_b ℓ_b, an ordinary second backward pass.
  The norm pass keeps the autograd graph for it and keeps nothing of the layers.
* `AssembleFromKept` (``flash_fuse``): the norm pass was the only backward pass; each counted layer kept
  what its plan needs (X and G, or its per-sample gradients, packed or not), and the clipped gradient is assembled
  from it: (c ⊙ G)ᵀX for a Linear weight, Σ_b c_b g_b from per-sample gradients, one weighted sum per packed buffer.

FSDP2's one-pass writer (reduce-scatter of the assembled gradients) is in `flashnorm.grad_sample.fsdp`. A new
writer subclasses `ClippedGradientWriter`; the norm pass asks it the three questions below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn as nn

from ..norms.registry import NormRule, clipped_from_per_sample


@dataclass
class KeptPerSample:
    """Per-sample gradients {θ: [B, *θ.shape]} kept apart from the packed buffers."""

    grads: Dict[nn.Parameter, torch.Tensor]

    def clipped_grads(self, rule: NormRule, layer: nn.Module, coef: torch.Tensor, backend: str):
        """Σ_b c_b ∇_θ ℓ_b for each kept θ."""
        return clipped_from_per_sample(self.grads, coef, backend=backend)


@dataclass
class KeptPacked:
    """Every per-sample gradient of the layer lives in the packed buffers, whose clipped sum covers it."""

    def clipped_grads(self, rule: NormRule, layer: nn.Module, coef: torch.Tensor, backend: str):
        return {}


@dataclass
class KeptInputs:
    """The layer input X and output gradient G, for the rule's clipped gradient (c ⊙ G)ᵀX.

    ``with_vectors`` is ``False`` when the rule's vector parameters (biases) went to the packed buffers.
    """

    method: str
    x: torch.Tensor
    g: torch.Tensor
    with_vectors: bool

    def clipped_grads(self, rule: NormRule, layer: nn.Module, coef: torch.Tensor, backend: str):
        return rule.clipped_grads(layer, self.x, self.g, coef, vectors=self.with_vectors, backend=backend)


@dataclass
class KeptGroup:
    """Same-shaped layers counted as one (`flashnorm.grad_sample.layer_groups`): their X and G stacked,
    [L·B, ...], for the rule's clipped gradients of all L at once. Kept under the group's first layer."""

    layers: List[nn.Module]
    x: torch.Tensor
    g: torch.Tensor

    def clipped_grads(self, rule: NormRule, layer: nn.Module, coef: torch.Tensor, backend: str):
        return rule.clipped_grads_grouped(self.layers, self.x, self.g, coef, backend=backend)


@dataclass
class KeptGroupGrads:
    """Same-shaped layers whose per-sample gradients were formed together (`flashnorm.grad_sample.layer_groups`):
    {parameter name: [L, B, numel]}, the L layers' in order. Kept under the group's first layer."""

    layers: List[nn.Module]
    grads: Dict[str, torch.Tensor]

    def clipped_grads(self, rule: NormRule, layer: nn.Module, coef: torch.Tensor, backend: str):
        """Σ_b c_b g_b of every layer's parameters: one batched product [B] × [L, B, numel] per name, in the per-sample
        gradients' dtype (float32, float64 for float64: c is never rounded to 16 bits)."""
        out = {}
        for name, grads in self.grads.items():
            summed = torch.matmul(coef.to(grads.dtype), grads)  # [L, numel]
            for module, grad in zip(self.layers, summed):
                param = getattr(module, name)
                out[param] = grad.view(param.shape)
        return out


class ClippedGradientWriter:
    """Writes a step's clipped gradients. One instance per grad-sample module (`bind` sees its layers).

    Attributes:
        backward_passes: backward passes per step (the modes table's column).
        retains_graph: the norm pass keeps the autograd graph (the writer back-propagates again).
        applies_kept_per_sample: per-sample gradients the norm pass measured are the very ones applied, so the
            planner may choose them for any layer (they cost B·|θ| memory) and their rounding needs no allowance;
            every trainable parameter, vectors and matrices, can be packed.
        scales_outputs: the model's outputs go through `RowScale`, whose
            rows the writer scales by c.
        assembles_groups: `write` takes `KeptGroup` and `KeptGroupGrads` records: same-shaped layers are counted as one
            (`flashnorm.grad_sample.layer_groups`).
    """

    backward_passes = 2
    retains_graph = True
    applies_kept_per_sample = False
    scales_outputs = False  # the forward routes the model's outputs through RowScale
    assembles_groups = False

    def bind(self, layers: List) -> None:
        """Called with the hooked layers whenever they are (re)discovered."""

    def keep(self, kept_by_layer: dict, layer, kept) -> None:
        """Stores what the norm pass counted of ``layer`` for `write` (nothing by default)."""

    def write(self, step, loss_per_sample: torch.Tensor, coef: torch.Tensor, backend: str) -> None:
        """Adds Σ_b c_b ∇ℓ_b into ``p.grad`` (``coef``: c [B]; ``step``: the `ClippingStep`)."""
        raise NotImplementedError


class SecondBackward(ClippedGradientWriter):
    """Back-propagates Σ_b ℓ_b with the model outputs' gradient rows scaled by c_b
    (`RowScale`): autograd computes Σ_b c_b ∇ℓ_b as an ordinary backward
    would, c_b applied where the model's batch row b is known, whatever order the loss vector has.

    A model whose outputs' batch rows cannot be told apart (an output with no dimension, or several, of the batch's
    size that is not the last hooked layer's own output) gets Σ_b c_b ℓ_b back-propagated instead: the loss vector
    must then be in the model's batch order.

    Raises:
        RuntimeError: the loss does not reach the model's outputs (no scaled row), after the backward: the caller
            discards what it wrote.
    """

    scales_outputs = True

    def write(self, step, loss_per_sample, coef, backend):
        scale = step.output_scale
        if not scale.tapped or scale.ambiguous:
            torch.autograd.backward((coef.detach().to(loss_per_sample.dtype) * loss_per_sample).sum())
            return
        scale.coef, scale.reached = coef.detach(), 0
        try:
            torch.autograd.backward(loss_per_sample.sum())
        finally:
            scale.coef = None
        if not scale.reached:
            raise RuntimeError(
                "The DP loss does not depend on the model's outputs, so the clipping coefficients could not be "
                "applied per sample. Build the loss from the wrapped model's output: criterion(model(x), y)."
            )


class AssembleFromKept(ClippedGradientWriter):
    """Assembles the clipped gradients from what the norm pass kept of each layer (its only backward pass)."""

    backward_passes = 1
    retains_graph = False
    applies_kept_per_sample = True
    assembles_groups = True

    def keep(self, kept_by_layer, layer, kept):
        kept_by_layer[layer] = kept

    def write(self, step, loss_per_sample, coef, backend):
        packed, step.packed = step.packed, None
        if packed is not None:  # every packed per-sample gradient: one weighted sum per buffer
            for p, grad in packed.clipped_sum(coef, backend=backend).items():
                p.grad = grad if p.grad is None else p.grad.add_(grad)
        kept_by_layer, step.kept = step.kept, {}
        for layer in step.layers:
            kept = kept_by_layer.get(layer)
            if kept is None:  # not reached by this loss, or an empty batch
                continue
            for p, grad in kept.clipped_grads(layer.rule, layer.module, coef, backend=backend).items():
                if grad.dtype != p.dtype:
                    grad = grad.to(p.dtype)
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad.add_(grad)
