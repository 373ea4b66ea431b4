"""``DPOptimizerFastGradientClipping`` with a fused noise tail.

Opacus's optimizer of the clipping modes copies every gradient into ``summed_grad`` and then
loops over parameters, drawing noise and dividing one tensor at a time. This subclass keeps its
semantics and changes only the cost of the tail:

* ``summed_grad`` aliases ``p.grad`` (no copy) unless the step accumulates a virtual batch
  (``BatchMemoryManager`` skip signals), where it is a copy as in Opacus;
* the noise for a bucket of parameters (same device and dtype, ~64M elements) is drawn with one
  ``torch.normal`` of std σ·C (the same i.i.d. N(0, σ²C²) per element, from ``generator``); adding it
  and the ``loss_reduction="mean"`` scaling are one multi-tensor pass over the bucket,
  g ← (g + ξ) / B (`flashnorm.kernels.multi_tensor.add_then_scale_`);
* the list of parameters is built once per step (Opacus's ``params`` property rebuilds it at each use).

``secure_mode=True`` draws with Opacus's floating-point-attack-resistant sampler, one parameter at a time,
then scales (Opacus's order).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping as _OpacusDPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed
from opacus.optimizers.utils import params as trainable_params

from ..grad_sample.provenance import clipped_iterations
from ..utils.privacy_parameters import PrivacyParameters, check_same_on_every_rank, privacy_attribute
from ..kernels.multi_tensor import add_then_scale_, same_kind_groups


#: Noise is drawn for buckets of parameters of about this many elements: a few launches per step (3 for
#: GPT-2 small; each bucket costs ~0.1 ms of host time on the H200's host) and a bounded temporary (256 MiB
#: in fp32) instead of one buffer the size of the model.
NOISE_BUCKET_ELEMENTS = 1 << 26


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


def same_kind_buckets(tensors):
    """The tensors in buckets of one device and dtype and at most ``NOISE_BUCKET_ELEMENTS`` elements, in order."""
    for same_kind in same_kind_groups(tensors) if tensors else ():
        yield from _buckets(same_kind, NOISE_BUCKET_ELEMENTS)


class DPOptimizerFastGradientClipping(_OpacusDPOptimizerFastGradientClipping):
    """``(optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size, loss_reduction="mean",
    generator=None, secure_mode=False)`` — Opacus's signature and semantics; fused tail.

    After the DP criterion's ``backward()``, ``p.grad`` holds Σ_b c_b ∇ℓ_b; ``step()`` makes it
    (Σ_b c_b ∇ℓ_b + N(0, σ²C²)) / expected_batch_size (``mean``) and steps the wrapped optimizer.
    """

    #: Noise and scaling in one pass per bucket; the FSDP optimizer, which adds only owned elements, says False.
    fuses_noise_and_scale = True
    #: The distributed optimizers say True: their first step checks that every rank steps with the same σ, C, loss
    #: reduction and expected batch size (one small all-reduce), as make_private did.
    checks_ranks_agree = False

    def __init__(self, optimizer, *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int, **kwargs):
        #: σ and C: this optimizer owns them; the DP criterion shares them with the grad-sample module.
        self.privacy = PrivacyParameters(noise_multiplier, max_grad_norm)
        super().__init__(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, **kwargs,
        )
        self._step_iterations: Optional[int] = None
        self._ranks_checked = not self.checks_ranks_agree
        # σ and C are fixed from a step's first clipped backward until the step (PrivacyParameters.pin)
        self.privacy.attach_step(self.gradients_waiting)

    noise_multiplier = privacy_attribute("noise_multiplier", "σ (Opacus's noise schedulers set it between steps).")
    max_grad_norm = privacy_attribute("max_grad_norm", "C (Opacus's clipping schedulers set it between steps).")

    @property
    def accumulated_iterations(self) -> int:
        """k: how many clipped backward passes the gradients of this step sum (the accountant records k × the
        sample rate and ``mean`` divides by k × the expected batch size, as in Opacus's hooks mode); 1 when no
        gradient was written (a step of noise alone)."""
        if self._step_iterations is not None:
            return self._step_iterations
        return self._clipped_iterations()

    def _clipped_iterations(self) -> int:
        """k from the gradients' provenance records.

        Raises:
            RuntimeError: a gradient the clipping workflow did not write, before anything changes.
        """
        counts = set()
        for p in self.params:
            if p.grad is None:
                continue
            k = clipped_iterations(p)
            if k is None:
                raise RuntimeError(
                    "optimizer.step() refused: a parameter's gradient was not produced by the clipping workflow (a "
                    "plain loss.backward(), e.g. HF's outputs.loss or a criterion other than the one make_private "
                    "returned; a gradient edited in place, e.g. by clip_grad_norm_; or one already used by a step). "
                    "Stepping on it would apply an unclipped gradient with noise and epsilon as if private. Build "
                    "the loss with the criterion that make_private returned, call optimizer.zero_grad(), and run "
                    "forward and backward again; no parameter has changed."
                )
            counts.add(k)
        if len(counts) > 1:
            raise RuntimeError(f"Parameters' gradients sum different numbers of clipped backward passes: {sorted(counts)}.")
        return counts.pop() if counts else 1

    def gradients_waiting(self) -> bool:
        """Whether clipped gradients wait for the next step: a clipped sum in some ``p.grad`` not yet used by a step,
        or the sums that skipped (virtual) steps accumulated."""
        for p in trainable_params(self):
            if p.grad is not None and clipped_iterations(p) is not None:
                return True
            if self._is_last_step_skipped and getattr(p, "summed_grad", None) is not None:
                return True
        return False

    @property
    def params(self):
        """The trainable parameters of every group (Opacus's list), built once per ``step``."""
        step_params = getattr(self, "_step_params", None)
        return step_params if step_params is not None else trainable_params(self)

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> bool:
        """Opacus's ``pre_step`` (accumulate; stop on a skip signal; noise; scale; step hook) with one parameter
        list for the whole step and the noise and scaling fused."""
        self._step_params = trainable_params(self)
        try:
            if not self._ranks_checked:  # first, on every rank: the collective must not wait for a rank that raised
                self._check_ranks_agree()
                self._ranks_checked = True
            # σ and C may have been changed since construction (Opacus's noise and clipping schedulers), but not
            # since the first clipped backward of the gradients this step applies.
            self.privacy.check_for_step()
            self._step_iterations = self._clipped_iterations()
            self.accumulate()
            if self._check_skip_next_step():
                self._is_last_step_skipped = True
                for p in self.params:  # accumulated into summed_grad: a later backward must not count it again
                    _mark_as_processed(p.grad)
                return False
            self.add_noise_and_scale_grad()
            self.privacy.release()
            if self.step_hook:
                self.step_hook(self)
            self._is_last_step_skipped = False
            return True
        finally:
            self._step_params = self._step_iterations = None

    def _check_ranks_agree(self) -> None:
        """Raises on every rank unless every rank steps with the same σ, C, loss reduction and expected batch size
        (σ and C may have been set on the optimizer since make_private checked them)."""
        if self.params:
            check_same_on_every_rank(
                {"max_grad_norm": self.max_grad_norm, "noise_multiplier": self.noise_multiplier,
                 "loss_reduction": self.loss_reduction, "expected_batch_size": self.expected_batch_size},
                self.params[0].device,
            )

    def accumulate(self):
        virtual_step = bool(self._check_skip_next_step(pop_next=False))
        for p in self.params:
            if p.grad is None:  # no gradient reached it (zero_grad with set_to_none): noise still applies
                p.grad = torch.zeros_like(p)
            if getattr(p, "summed_grad", None) is not None:  # (a parameter unfrozen after construction has none)
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
        """``p.grad`` ← Σ_b c_b ∇ℓ_b + N(0, σ²C²) per element, the noise drawn once per element."""
        grads = self._checked_summed_grads()
        std = self._noise_std()
        if std > 0:
            if self.secure_mode:
                self._add_secure_noise(grads, std)
            else:
                for bucket in same_kind_buckets(grads):
                    self._add_noise_to_bucket(bucket, std)
        self._publish_summed_grads()

    def add_noise_and_scale_grad(self):
        """`add_noise` then `scale_grad`, as one pass g ← (g + ξ) · s over each bucket when they fuse
        (not under ``secure_mode``, whose sampler works per parameter, nor without noise)."""
        std = self._noise_std()
        if self.secure_mode or std == 0 or not self.fuses_noise_and_scale:
            self.add_noise()
            self.scale_grad()
            return
        grads = self._checked_summed_grads()
        factor = self._grad_scale()
        for bucket in same_kind_buckets(grads):
            add_then_scale_(bucket, self._bucket_noise(bucket, std), factor)
        self._publish_summed_grads()

    def scale_grad(self):
        """Applies ``loss_reduction``: one ``foreach`` multiplication by `_grad_scale`."""
        factor = self._grad_scale()
        grads = self._local_grads()
        if factor != 1.0 and grads:
            torch._foreach_mul_(grads, factor)

    # -- the pieces the distributed optimizers override -------------------------------------------
    def _noise_std(self) -> float:
        """σ·C (σ adjusted by adaptive clipping when set, as in Opacus)."""
        return getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm

    def _checked_summed_grads(self):
        """The summed gradients, refusing any already used by a step (Opacus's processed flag)."""
        grads = [p.summed_grad for p in self.params]
        for g in grads:
            _check_processed_flag(g)
        return grads

    def _bucket_noise(self, bucket, std: float) -> torch.Tensor:
        """ξ ~ N(0, std²) i.i.d., flat [Σ numel], for a bucket of one device and dtype: one ``torch.normal``
        from ``generator``."""
        size = sum(g.numel() for g in bucket)
        return torch.normal(0.0, std, size=(size,), device=bucket[0].device, dtype=bucket[0].dtype,
                            generator=self.generator)

    def _add_noise_to_bucket(self, bucket, std: float) -> None:
        """The bucket's noise added in one pass."""
        add_then_scale_(bucket, self._bucket_noise(bucket, std), 1.0)

    def _add_secure_noise(self, grads, std: float) -> None:
        """``secure_mode``: Opacus's floating-point-attack-resistant sampler, one parameter at a time."""
        for g in grads:
            g.add_(_generate_noise(std=std, reference=g, generator=self.generator, secure_mode=True))

    def _publish_summed_grads(self) -> None:
        for p in self.params:
            if p.grad is not p.summed_grad:
                p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def _grad_scale(self) -> float:
        """1 / (expected batch size × accumulated iterations) for ``mean``; 1 for ``sum``."""
        if self.loss_reduction == "mean":
            return 1.0 / (self.expected_batch_size * self.accumulated_iterations)
        return 1.0

    def _local_grads(self):
        return [p.grad for p in self.params]
