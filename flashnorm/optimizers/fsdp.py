"""DP optimizer of the clipping modes under FSDP2 (``ghost_fsdp``, ``flash_fsdp``, ``flash_fuse_fsdp``).

W ranks, rank r with local batch ℬ_r and local clipped sum S_r = Σ_{b∈ℬ_r} c_b ∇ℓ_b. Before ``step()``
every parameter's ``p.grad`` is a ``DTensor`` whose shard on rank r is shard_r(Ḡ), Ḡ = (1/W) Σ_r S_r:
FSDP's averaging reduce-scatter (see `flashnorm.grad_sample.fsdp`). ``step()`` makes

    p.grad = shard_r( (Ḡ + ξ/W) · W/B ) = shard_r( (Σ_r S_r + ξ) / B )      (loss_reduction="mean")
    p.grad = shard_r( (Ḡ + ξ/W) · W )   = shard_r(  Σ_r S_r + ξ )           ("sum")

with ξ ~ N(0, σ²C²) i.i.d. per element of the *full* parameter and B = W · ``expected_batch_size`` the
expected global batch size (Opacus passes the per-worker one): the single-process step on the union
batch. (Opacus 1.6's FSDP optimizer leaves Ḡ + N(0, σ²C²) for ``sum``, a 1/W signal.)

Noise: every element is owned by exactly one rank, after the reduce-scatter; that rank adds its noise.
Each rank draws ξ for the full parameter tensors, in the same buckets as the single-device optimizer,
from its own ``generator``, and keeps the elements it owns. So

* each element receives exactly one draw, never one per rank;
* with ``noise_generator`` seeded alike on every rank (or the same global seed), ξ is bit for bit the
  noise a single-device run with that seed adds, and two elements never share a draw — drawing only the
  local shard would give every rank the same numbers, correlating elements across shards;
* under ``secure_mode`` each rank's CSPRNG draws (Opacus's floating-point-attack-resistant sampler,
  per parameter); the owned elements are still independent draws.

The price is drawing W× the random numbers (a few milliseconds for 10⁸ elements on a GPU) and a
transient of one bucket (~64M elements) of full-shape noise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from opacus.optimizers.optimizer import _generate_noise

from ..utils.fsdp_utils import owned_part
from .fast_gradient_clipping import DPOptimizerFastGradientClipping


class FSDPOptimizerFastGradientClipping(DPOptimizerFastGradientClipping):
    """``(optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size, loss_reduction="mean",
    generator=None, secure_mode=False)`` over FSDP2's sharded ``DTensor`` parameters; ``expected_batch_size``
    is per worker, as Opacus passes it. See the module docstring for the step.
    """

    checks_ranks_agree = True

    def __init__(self, optimizer, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.world_size = dist.get_world_size()

    def _noise_std(self) -> float:
        """σ·C/W: FSDP's reduce-scatter averaged the signal over the W ranks (see the module)."""
        return super()._noise_std() / self.world_size

    #: Only owned elements get noise: added, then scaled (two passes).
    fuses_noise_and_scale = False

    def _add_noise_to_bucket(self, bucket, std: float) -> None:
        """Draws the bucket's full-shape noise (as on one device) and adds the owned elements."""
        flat = self._bucket_noise(bucket, std)  # DTensor numel: full (global) sizes
        noise = [owned_part(n.view(g.shape), g) for n, g in zip(flat.split([g.numel() for g in bucket]), bucket)]
        torch._foreach_add_([g.to_local() for g in bucket], noise)

    def _add_secure_noise(self, grads, std: float) -> None:
        for g in grads:
            noise = _generate_noise(std=std, reference=g, generator=self.generator, secure_mode=True)
            g.to_local().add_(owned_part(noise.to(g.dtype), g))

    def _grad_scale(self) -> float:
        """(Ḡ + ξ/W) × W/B = (Σ_r S_r + ξ)/B for ``mean`` (B = W · expected_batch_size); × W for ``sum``."""
        return super()._grad_scale() if self.loss_reduction == "mean" else float(self.world_size)

    def _local_grads(self):
        return [p.grad.to_local() for p in self.params]
