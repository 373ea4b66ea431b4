"""Grad-sample modules for a model wrapped with PyTorch's ``DistributedDataParallel`` (modes ``ghost``,
``flash``, ``flash_fuse``).

Rank r holds its local batch ℬ_r. The clipping workflow runs on each rank alone — sample b's norm
‖∇ℓ_b‖ is computed on the rank that holds it, from that rank's X and G, and is never summed with
another rank's norms — and leaves the *local* clipped sum

    S_r = Σ_{b∈ℬ_r} c_b ∇ℓ_b                                   (p.grad on rank r, every parameter)

DDP's forward runs under `DistributedDataParallel.no_sync`, so DDP's reducer
never averages gradients during a backward pass: in the two-pass modes the second pass would
otherwise all-reduce once and the DP optimizer a second time, and in ``flash_fuse`` the gradients are
assembled after the backward pass, where DDP's hooks never see them. The one reduction per step is the
DP optimizer's (`flashnorm.optimizers.distributed.DistributedDPOptimizerFastGradientClipping`):
rank 0 adds the noise, then one SUM all-reduce gives Σ_r S_r + noise on every rank.

Opacus's ``DPDDP`` reduces nothing in the backward pass either; it needs no subclass (the plain
grad-sample modules are used).
"""

from __future__ import annotations

from .module import FlashNormGradSampleModule
from .writers import AssembleFromKept, SecondBackward


class DDPGradSampleModule(FlashNormGradSampleModule):
    """Runs the wrapped DDP module's forward under ``no_sync()``: its backward passes reduce nothing, and
    ``p.grad`` ends as the local S_r."""

    def forward(self, *args, **kwargs):
        with self._module.no_sync():
            return super().forward(*args, **kwargs)


class DDPGradSampleModuleFastGradientClipping(DDPGradSampleModule):
    """Two passes (``ghost``, ``flash``) on a DDP-wrapped model."""

    writer_class = SecondBackward


class DDPGradSampleModuleFastGradientClippingFuse(DDPGradSampleModule):
    """One pass (``flash_fuse``) on a DDP-wrapped model."""

    writer_class = AssembleFromKept
