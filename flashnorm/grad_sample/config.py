"""The configuration a clipping step reads: fixed when the grad-sample module is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..norms.planner import choose
from .capture import HookedLayer
from .writers import ClippedGradientWriter


@dataclass(frozen=True)
class StepConfig:
    """How a step captures, measures and writes: the grad-sample module's configuration.

    Attributes:
        backend: the kernels' resolved backend.
        norm_algorithm: the mode's algorithm, the planner's starting point.
        norm_method: a forced method, or ``None`` (planned per layer).
        writer: the mode's `ClippedGradientWriter`.
        batch_first: inputs are ``[B, ...]`` (else ``[T, B, ...]``).
        distributed: gradients are reduced across ranks by DDP or FSDP2 (the loss is checked before any
            collective).
        one_sample_shortcut: a batch of one sample takes one ordinary backward, its gradient clipped whole (it is
            the sample's gradient: on one process, and under DDP, whose forward runs under ``no_sync``; not under
            FSDP2, where a rank holds shards of it).
        packs_per_sample_grads: per-sample gradients go to packed buffers
            (`PackedPerSampleGrads`); ``False`` under FSDP2.
        splits_norms: a plain backward's norms are split by parameter (Opacus's ``p._norm_sample``); ``False``
            under FSDP2, whose rules see the unsharded parameters.
    """

    backend: str
    norm_algorithm: str
    norm_method: Optional[str]
    writer: ClippedGradientWriter
    batch_first: bool = True
    distributed: bool = False
    one_sample_shortcut: bool = True
    packs_per_sample_grads: bool = True
    splits_norms: bool = True

    def method(self, layer: HookedLayer, x: torch.Tensor, g_shape, g_dtype, g: Optional[torch.Tensor] = None) -> str:
        """The layer's norm method for these shapes (planned once per new shape; ``g`` may be absent). Layers
        sharing a parameter keep their X and G (no per-sample gradients) unless forced."""
        key = (x.shape, g_shape, g_dtype)
        if layer.plan is None or layer.plan[0] != key:
            if g is None:
                g = torch.empty(g_shape, dtype=g_dtype, device="meta")
            method = choose(
                layer.rule, layer.module, x, g, base=self.norm_algorithm,
                fused=self.writer.applies_kept_per_sample and not layer.shared, override=self.norm_method,
                name=layer.name,
            )
            layer.plan = (key, method)
        return layer.plan[1]
