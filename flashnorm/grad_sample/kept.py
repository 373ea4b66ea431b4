"""What a one-pass step keeps of a layer between its backward hook and the assembly of clipped gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

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
