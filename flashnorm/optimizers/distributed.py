"""DP optimizer of the clipping modes under data parallelism (PyTorch DDP or Opacus's ``DPDDP``).

W ranks, rank r with local batch ℬ_r. Before ``step()``, ``p.grad`` on rank r holds the local clipped
sum S_r = Σ_{b∈ℬ_r} c_b ∇ℓ_b (nothing was reduced in the backward pass: see
`flashnorm.grad_sample.ddp`). ``step()`` then makes, on every rank,

    p.grad = (Σ_r S_r + ξ) / B        (loss_reduction="mean")      or      Σ_r S_r + ξ        ("sum")

with ξ ~ N(0, σ²C²) i.i.d. per element and B = W · ``expected_batch_size`` the expected *global*
batch size (Opacus's ``make_private`` passes the per-worker expected batch size when the module is
distributed). This is the single-process step on the union batch ∪_r ℬ_r, whatever the local batch
sizes.

Noise is drawn once, by rank 0 alone, with rank 0's ``generator`` (or its CSPRNG under
``secure_mode``), and added to rank 0's local sum *before* the SUM all-reduce, which then carries it to
every rank. The replicas stay identical whatever the other ranks' generators are, and an unseeded or
secure generator is never asked to agree across processes. With the same seed, rank 0 draws exactly the
noise the single-device optimizer draws.

The all-reduce is one collective per bucket of ~64M gradient elements (flattened), not one per parameter.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from .fast_gradient_clipping import DPOptimizerFastGradientClipping, same_kind_buckets


class DistributedDPOptimizerFastGradientClipping(DPOptimizerFastGradientClipping):
    """``(optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size, loss_reduction="mean",
    generator=None, secure_mode=False)``; ``expected_batch_size`` is per worker, as Opacus passes it.

    See the module docstring for the step. Must be stepped on every rank (it all-reduces).
    """

    checks_ranks_agree = True

    def __init__(self, optimizer, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def _noise_std(self) -> float:
        """σ·C on rank 0, which alone adds noise (S_0 + ξ: the single-device tail); 0 elsewhere (S_r unchanged)."""
        return super()._noise_std() if self.rank == 0 else 0.0

    def _grad_scale(self) -> float:
        """1 / (W · ``expected_batch_size``) for ``mean``: the expected global batch size."""
        return super()._grad_scale() / (self.world_size if self.loss_reduction == "mean" else 1)

    def reduce_gradients(self):
        """``p.grad`` ← Σ_r p.grad_r on every rank: one SUM all-reduce per flattened bucket."""
        for bucket in same_kind_buckets([p.grad for p in self.params]):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            reduced = flat.split([g.numel() for g in bucket])
            torch._foreach_copy_(bucket, [r.view_as(g) for r, g in zip(reduced, bucket)])

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            self.reduce_gradients()
            return self.original_optimizer.step()
        return None
