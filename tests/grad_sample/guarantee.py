"""The guarantee's harness: every DP step keeps each sample's influence ≤ C, or refuses with θ unchanged.

A scenario ``make(batch) -> Attempt`` sets a model up (make_private, earlier steps, the misuse) and returns the
step still to run. `bounded_or_refused` runs it twice, with the adversarial batch and with the batch less
that sample. "Influence" is ‖u_with − u_without‖ where u = (θ_before − θ_after) · scale is what
``optimizer.step()`` applied, brought back to Σ_b c_b ∇ℓ_b (noise 0, SGD with lr = 1; scale = k × the expected
batch size for ``mean`` over k accumulated backward passes).

The probe scenario: ``probe()`` ([B, T, 4] → Linear → tanh → Linear → [B, T, 3]) under `LinearLoss`,
whose output gradients are chosen (``batch``), and ``adversarial()``, a batch whose last sample is far outside
the bound.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from flashnorm.utils.export import unwrap_model
from tests.conftest import CLIPPING_MODES
from tests.oracle import OracleStep, microbatch_reference

#: The one mode list of the guarantee tests.
MODES = CLIPPING_MODES
#: Errors a misused step may raise: they must name the problem (a row's pattern) and leave θ as it was.
REFUSALS = (RuntimeError, ValueError, NotImplementedError)
#: A refusal pattern that nothing matches: the step must go through.
NEVER = r"$^"
NO_CAPTURE = "No captured forward pass"
NOT_CLIPPED = "not produced by the clipping workflow"
#: The probe scenario's clipping bound.
C = 1.0


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
    """The oracle's ℓ_b for `LinearLoss`."""
    return (out * target).sum()


def cross_entropy_sum(out, target):
    """The oracle's ℓ_b for ``nn.CrossEntropyLoss``."""
    return nn.functional.cross_entropy(out, target, reduction="sum")


@dataclass
class Private:
    engine: FlashNormPrivacyEngine
    model: nn.Module  # the wrapped module
    optimizer: torch.optim.Optimizer
    criterion: Callable
    loader: DataLoader
    module: Optional[nn.Module] = None  # the user's module that was made private (whose parameters a step changes)


def make_private(model, mode, *, clip, sigma=0.0, data=None, batch_size=4, reduction="sum", criterion=None,
                 engine=None, **kwargs) -> Private:
    """``engine``'s (default: FlashNorm's) make_private with SGD(lr=1), noise 0 by default and a sequential loader
    over ``data`` (a tuple of tensors; default 8 placeholder samples: sample rate 1/2, expected batch size 4).
    ``criterion`` defaults to `LinearLoss`; Opacus's per-sample-gradient modes hand it back unwrapped."""
    engine = engine if engine is not None else FlashNormPrivacyEngine()
    criterion = criterion if criterion is not None else LinearLoss(reduction)
    loader = DataLoader(TensorDataset(*(data if data is not None else (torch.zeros(8),))), batch_size=batch_size)
    out = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        criterion=criterion, noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=False,
        grad_sample_mode=mode, loss_reduction=reduction, **kwargs,
    )
    if len(out) == 3:  # (model, optimizer, loader)
        out = (out[0], out[1], criterion, out[2])
    return Private(engine, *out, module=model)


def step(private: Private, x, target) -> None:
    """One DP step: the returned criterion's backward, then ``optimizer.step()``."""
    private.criterion(private.model(x), target).backward()
    private.optimizer.step()


def virtual_steps(private: Private, max_physical_batch_size: int = 3,
                  between: Optional[Callable[[], None]] = None) -> None:
    """One logical step over ``private.loader`` in ``BatchMemoryManager``'s physical batches: a `step` and
    ``zero_grad()`` on each, then ``between()`` (if given)."""
    with BatchMemoryManager(data_loader=private.loader, max_physical_batch_size=max_physical_batch_size,
                            optimizer=private.optimizer) as loader:
        for x, target in loader:
            step(private, x, target)
            private.optimizer.zero_grad()
            if between is not None:
                between()


def snapshot(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} changed"


def reference(wrapped: nn.Module, x, target, clip, loss=sample_loss, **kwargs) -> OracleStep:
    """The float64 microbatch loop for the wrapped module as it is now (a copy without hooks; flags, attributes
    and frozen parameters included; ``kwargs``: those of `microbatch_reference`)."""
    user_module = unwrap_model(wrapped)
    modules = list(user_module.modules())
    hooks = [(m._forward_hooks, m._forward_pre_hooks) for m in modules]
    for m in modules:  # copied without them: they hold the wrapper and this step's captures
        m._forward_hooks, m._forward_pre_hooks = type(m._forward_hooks)(), type(m._forward_pre_hooks)()
    try:
        inner = copy.deepcopy(user_module)
    finally:
        for m, (forward, pre) in zip(modules, hooks):
            m._forward_hooks, m._forward_pre_hooks = forward, pre
    return microbatch_reference(inner, x, target, loss, clip, **kwargs)


def oracle(wrapped: nn.Module, x, target, clip, loss=sample_loss) -> torch.Tensor:
    """The `reference`'s Σ_b c_b ∇ℓ_b, flat over ``parameters()`` (zeros where frozen)."""
    clipped = reference(wrapped, x, target, clip, loss).clipped_sum
    return torch.cat([
        clipped[name].flatten() if name in clipped else torch.zeros(p.numel(), dtype=torch.float64)
        for name, p in unwrap_model(wrapped).named_parameters()
    ])


@dataclass
class Attempt:
    """The step still to run: ``act()`` ends with ``optimizer.step()`` (or raises)."""

    model: nn.Module  # whose parameters the step changes
    act: Callable[[], None]
    scale: float = 1.0  # applied update → Σ_b c_b ∇ℓ_b
    expected: Optional[torch.Tensor] = None  # the oracle's Σ_b c_b ∇ℓ_b (float64 rows): the step must be exact


def step_on(private: Private, x, target, exact_at: Optional[float] = None) -> Attempt:
    """The attempt of one `step` of ``private`` on (``x``, ``target``); with ``exact_at``, it must apply the
    `oracle`'s Σ_b c_b ∇ℓ_b at that bound (computed now, from the module as it is before the step)."""
    expected = oracle(private.model, x, target, exact_at) if exact_at is not None else None
    return Attempt(private.module, lambda: step(private, x, target), expected=expected)


def one_step(build: Callable[[], nn.Module], mode, *, clip=C, **kwargs) -> Callable[..., Attempt]:
    """The scenario ``make(batch)`` of a plain DP step: a fresh ``build()`` made private (``clip``, ``kwargs``: those
    of `make_private`), then `step_on` the batch."""
    def make(b):
        return step_on(make_private(build(), mode, clip=clip, **kwargs), *b)
    return make


def run(attempt: Attempt, refusal: str, errors=REFUSALS) -> Optional[torch.Tensor]:
    """What the step applied (flat float64 Σ_b c_b ∇ℓ_b), or ``None`` when it refused (one of ``errors``) with a
    message matching ``refusal`` and left every parameter bit-identical."""
    before = snapshot(attempt.model)
    try:
        attempt.act()
    except errors as err:
        assert re.search(refusal, str(err)), f"unclear refusal: {type(err).__name__}: {err}"
        assert_unchanged(attempt.model, before)
        return None
    return torch.cat([
        (before[name].double() - p.detach().double()).flatten() for name, p in attempt.model.named_parameters()
    ]) * attempt.scale


def bounded_or_refused(make: Callable[..., Attempt], adversarial, benign, clip: float, refusal: str,
                       errors=REFUSALS) -> Optional[float]:
    """Influence of the adversarial sample (asserted ≤ C(1 + 1e-3)), or ``None`` when the step was refused.

    ``make(batch)`` builds a fresh scenario for ``batch`` (a tuple of tensors); ``benign`` is ``adversarial``
    less that sample. Where the attempts give the oracle's sum, both steps must then also apply it exactly.
    """
    attempts = [make(adversarial)]
    with_it = run(attempts[0], refusal, errors)
    if with_it is None:
        return None
    attempts.append(make(benign))
    without = run(attempts[1], refusal, errors)
    assert without is not None, "refused without the adversarial sample, stepped with it"
    influence = float((with_it - without).norm())
    assert influence <= clip * (1 + 1e-3), f"influence {influence:.4g} > C = {clip}"
    for attempt, applied in zip(attempts, (with_it, without)):
        if attempt.expected is not None:
            torch.testing.assert_close(applied, attempt.expected, rtol=1e-10, atol=1e-12)
    return influence


def influence(make, batches, clip=C, refusal=NEVER, errors=REFUSALS) -> Optional[float]:
    """`bounded_or_refused` for ``batches`` = (batch with the adversarial sample last, batch without it)."""
    return bounded_or_refused(make, *batches, clip, refusal, errors)


# -- the probe scenario ----------------------------------------------------------------------------------------
def probe(dtype=torch.float64) -> nn.Module:
    """[B, T, 4] → Linear → tanh → Linear → [B, T, 3]."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def batch(n, seed, t=6):
    """(X [n, t, 4], G [n, t, 3]) float64, standard normal."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 4, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, t, 3, generator=gen, dtype=torch.float64)


def without_last(x, target):
    """(the batch, the batch less its last sample)."""
    return (x, target), (x[:-1], target[:-1])


def adversarial(n=4):
    """(batch with the adversarial sample last, the batch without it): its input is 10× and its output gradients
    1e3× larger."""
    x, g = batch(n, seed=1)
    x[-1] *= 10
    g[-1] *= 1e3
    return without_last(x, g)


def sized(batch_size):
    """`adversarial` with ``batch_size`` samples (B = 1: the batch without it is empty, as Poisson sampling's)."""
    (x, g), _ = adversarial(4)
    return without_last(x[4 - batch_size:], g[4 - batch_size:])

