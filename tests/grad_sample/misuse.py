"""Harness of the misuse tests (issue 18): a step is bounded (influence ≤ C) or refused (parameters unchanged).

A scenario ``make(batch) -> Attempt`` sets a model up (make_private, earlier steps, the misuse) and returns the
step still to run. :func:`bounded_or_refused` runs it twice, with the adversarial batch and with the batch less
that sample. "Influence" is ‖u_with − u_without‖ where u = (θ_before − θ_after) · scale is what
``optimizer.step()`` applied, brought back to Σ_b c_b ∇ℓ_b (noise 0, SGD with lr = 1; scale = k × the expected
batch size for ``mean`` over k accumulated backward passes).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from tests.oracle import microbatch_reference

MODES = ("ghost", "flash", "flash_fuse")
#: Errors a misused step may raise: they must name the problem (a row's pattern) and leave θ as it was.
REFUSALS = (RuntimeError, ValueError, NotImplementedError)


class LinearLoss(nn.Module):
    """ℓ_b = ⟨out_b, G_b⟩ with G = ``target`` (same shape as ``out``, batch first): the output gradient of
    sample b is exactly the chosen G_b. ``reduction`` as in ``nn`` losses (the DP criterion sets "none")."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = (out * target).flatten(1).sum(dim=1)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def sample_loss(out, target):
    """The oracle's ℓ_b for :class:`LinearLoss`."""
    return (out * target).sum()


@dataclass
class Private:
    engine: FlashNormPrivacyEngine
    model: nn.Module  # the wrapped module
    optimizer: torch.optim.Optimizer
    criterion: Callable
    loader: DataLoader


def make_private(model, mode, *, clip, sigma=0.0, data=None, batch_size=4, reduction="sum", criterion=None, **kwargs):
    """FlashNorm's make_private with SGD(lr=1), noise 0 by default and a sequential loader over ``data`` (a tuple
    of tensors; default 8 placeholder samples: sample rate 1/2, expected batch size 4)."""
    engine = FlashNormPrivacyEngine()
    loader = DataLoader(TensorDataset(*(data if data is not None else (torch.zeros(8),))), batch_size=batch_size)
    out = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        criterion=criterion if criterion is not None else LinearLoss(reduction), noise_multiplier=sigma,
        max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode, loss_reduction=reduction, **kwargs,
    )
    return Private(engine, *out)


def snapshot(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} changed"


def oracle(wrapped: nn.Module, x, target, clip, loss=sample_loss) -> torch.Tensor:
    """Σ_b c_b ∇ℓ_b of the float64 microbatch loop for the wrapped module as it is now (a copy without hooks;
    flags and frozen parameters included), flat over ``parameters()`` (zeros where frozen)."""
    modules = list(wrapped._module.modules())
    hooks = [(m._forward_hooks, m._forward_pre_hooks) for m in modules]
    for m in modules:  # copied without them: they hold the wrapper and this step's captures
        m._forward_hooks, m._forward_pre_hooks = type(m._forward_hooks)(), type(m._forward_pre_hooks)()
    try:
        inner = copy.deepcopy(wrapped._module)
    finally:
        for m, (forward, pre) in zip(modules, hooks):
            m._forward_hooks, m._forward_pre_hooks = forward, pre
    step = microbatch_reference(inner, x, target, loss, clip)
    return torch.cat([
        step.clipped_sum[name].flatten() if name in step.clipped_sum else torch.zeros(p.numel(), dtype=torch.float64)
        for name, p in inner.named_parameters()
    ])


@dataclass
class Attempt:
    """The step still to run: ``act()`` ends with ``optimizer.step()`` (or raises)."""

    model: nn.Module  # whose parameters the step changes
    act: Callable[[], None]
    scale: float = 1.0  # applied update → Σ_b c_b ∇ℓ_b
    expected: Optional[torch.Tensor] = None  # the oracle's Σ_b c_b ∇ℓ_b (float64 rows): the step must be exact


def run(attempt: Attempt, refusal: str) -> Optional[torch.Tensor]:
    """What the step applied (flat float64 Σ_b c_b ∇ℓ_b), or ``None`` when it refused with a message matching
    ``refusal`` and left every parameter bit-identical."""
    before = snapshot(attempt.model)
    try:
        attempt.act()
    except REFUSALS as err:
        assert re.search(refusal, str(err)), f"unclear refusal: {type(err).__name__}: {err}"
        assert_unchanged(attempt.model, before)
        return None
    return torch.cat([
        (before[name].double() - p.detach().double()).flatten() for name, p in attempt.model.named_parameters()
    ]) * attempt.scale


def bounded_or_refused(make: Callable[..., Attempt], adversarial, benign, clip: float, refusal: str) -> Optional[float]:
    """Influence of the adversarial sample (asserted ≤ C(1 + 1e-3)), or ``None`` when the step was refused.

    ``make(batch)`` builds a fresh scenario for ``batch`` (a tuple of tensors); ``benign`` is ``adversarial``
    less that sample. Where the attempts give the oracle's sum, both steps must then also apply it exactly.
    """
    attempts = [make(adversarial)]
    with_it = run(attempts[0], refusal)
    if with_it is None:
        return None
    attempts.append(make(benign))
    without = run(attempts[1], refusal)
    assert without is not None, "refused without the adversarial sample, stepped with it"
    influence = float((with_it - without).norm())
    assert influence <= clip * (1 + 1e-3), f"influence {influence:.4g} > C = {clip}"
    for attempt, applied in zip(attempts, (with_it, without)):
        if attempt.expected is not None:
            torch.testing.assert_close(applied, attempt.expected, rtol=1e-10, atol=1e-12)
    return influence
