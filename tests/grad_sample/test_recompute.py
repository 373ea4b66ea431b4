"""Activation checkpointing without its random-number state (``preserve_rng_state=False``) around dropout: the
two-pass modes' second backward would redraw the masks and apply a gradient whose norm nobody measured, so the step
is refused, parameters unchanged; flash_fuse recomputes once (measured and applied alike); with the state preserved
(the default) every mode is bounded."""

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint

from tests.grad_sample.guarantee import (
    MODES, NEVER, Attempt, C, adversarial, batch, influence, make_private, probe, run, sized, step, step_on,
)


class _DropoutBlocks(nn.Module):
    def __init__(self, reentrant: bool, preserve: bool):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh()).double()
        self.head = nn.Linear(5, 3).double()
        self.reentrant, self.preserve = reentrant, preserve

    def forward(self, x):
        if self.reentrant:
            x = x.detach().requires_grad_(True)
        h = checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant, preserve_rng_state=self.preserve)
        return self.head(h)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("preserve", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_a_recompute_with_other_random_draws_is_refused_in_two_passes(mode, reentrant, preserve):
    def make(b):
        x, g = b
        torch.manual_seed(1)
        model = _DropoutBlocks(reentrant, preserve)
        private = make_private(model, mode, clip=C)

        def act():
            torch.manual_seed(2)
            private.criterion(private.model(x), g).backward()
            private.optimizer.step()

        return Attempt(model, act)

    if mode == "flash_fuse" and not preserve:
        # one recompute, measured and applied alike; the masks differ between the runs with and without the
        # adversarial sample, so only the per-sample bound of the whole update is checked here
        applied = run(make(adversarial()[0]), NEVER)
        assert applied is not None and float(applied.norm()) <= 4 * C * (1 + 1e-3)
        return
    refused = not preserve
    measured = influence(make, adversarial(), refusal="drew random numbers" if refused else NEVER)
    assert (measured is None) == refused


class _CheckpointedProbe(nn.Module):
    """The probe (Linear → tanh → Linear) inside one non-reentrant checkpoint."""

    def __init__(self):
        super().__init__()
        self.block = probe()

    def forward(self, x):
        return checkpoint.checkpoint(self.block, x, use_reentrant=False)


@pytest.mark.parametrize("mode", MODES)
def test_the_one_sample_shortcut_through_checkpointing_bounds_an_adversarial_sample(mode):
    """After a step of one sample, the adversarial sample alone takes the one-sample shortcut (hooks parked, the
    checkpointed block recomputed only as far as autograd needs): its influence against an empty batch is ≤ C(1 +
    10⁻³), and the step is the float64 oracle's."""
    parked = []

    def make(b):
        x, g = b
        private = make_private(_CheckpointedProbe(), mode, clip=C, batch_size=1)
        step(private, *batch(1, seed=2))  # a step of one sample: the next one of one sample is trusted
        private.optimizer.zero_grad()
        attempt = step_on(private, x, g, exact_at=C)

        def act():
            out = private.model(x)
            parked.append(private.model.hooks.parked)
            private.criterion(out, g).backward()
            private.optimizer.step()

        attempt.act = act
        return attempt

    assert influence(make, sized(1)) is not None
    assert parked[0], "the adversarial sample's step must take the one-sample shortcut"
