"""``DPOptimizerFastGradientClipping`` with a fused noise tail.

Opacus's optimizer of the clipping modes copies every gradient into ``summed_grad`` and then
loops over parameters, drawing noise and dividing one tensor at a time. This subclass keeps its
semantics and changes only the cost of the tail:

* ``summed_grad`` aliases ``p.grad`` (no copy) unless the step accumulates a virtual batch
  (``BatchMemoryManager`` skip signals), where it is a copy as in Opacus;
* the noise for a bucket of parameters (same device and dtype, ~16M elements) is drawn with one
  ``torch.normal`` of std σ·C (the same i.i.d. N(0, σ²C²) per element, from ``generator``) and
  added with one ``torch._foreach_add_``; ``loss_reduction="mean"`` divides with one ``torch._foreach_div_``.

``secure_mode=True`` keeps Opacus's per-parameter path (its floating-point-attack-resistant noise).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping as _OpacusDPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed


#: Noise is drawn for buckets of parameters of about this many elements: a few launches per step and a
#: bounded temporary (64 MiB in fp32) instead of one buffer the size of the model.
NOISE_BUCKET_ELEMENTS = 1 << 24


def _buckets(tensors, limit):
    """Consecutive groups of ``tensors`` holding at most ``limit`` elements (a larger tensor alone)."""
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


class DPOptimizerFastGradientClipping(_OpacusDPOptimizerFastGradientClipping):
    """``(optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size, loss_reduction="mean",
    generator=None, secure_mode=False)`` — Opacus's signature and semantics; fused tail.

    After the DP criterion's ``backward()``, ``p.grad`` holds Σ_b c_b ∇ℓ_b; ``step()`` makes it
    (Σ_b c_b ∇ℓ_b + N(0, σ²C²)) / expected_batch_size (``mean``) and steps the wrapped optimizer.
    """

    def accumulate(self):
        virtual_step = bool(self._check_skip_next_step(pop_next=False))
        for p in self.params:
            if p.grad is None:  # no gradient reached it (zero_grad with set_to_none): noise still applies
                p.grad = torch.zeros_like(p)
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach().clone() if virtual_step else p.grad

    def zero_grad(self, set_to_none: bool = True):
        """Opacus's ``zero_grad``; like ``torch.optim``, it sets gradients to ``None`` by default."""
        super().zero_grad(set_to_none)
        for p in self.params:  # an aliased, already-noised gradient was zeroed in place: it is fresh now
            if p.grad is not None and hasattr(p.grad, "_processed"):
                del p.grad._processed

    def add_noise(self):
        if self.secure_mode:
            return super().add_noise()
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        groups = defaultdict(list)
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            groups[(p.summed_grad.device, p.summed_grad.dtype)].append(p.summed_grad)
        if std > 0:
            for (device, dtype), grads in groups.items():
                for bucket in _buckets(grads, NOISE_BUCKET_ELEMENTS):
                    sizes = [g.numel() for g in bucket]
                    flat = torch.normal(0.0, std, size=(sum(sizes),), device=device, dtype=dtype, generator=self.generator)
                    torch._foreach_add_(bucket, [n.view_as(g) for n, g in zip(flat.split(sizes), bucket)])
        for p in self.params:
            if p.grad is not p.summed_grad:
                p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self):
        if self.loss_reduction == "mean":
            grads = [p.grad for p in self.params]
            if grads:
                torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)
