"""``get_epsilon`` after a step without noise: ``inf`` for every accountant (Opacus's GDP and PRV accountants raise
on σ = 0), and Opacus's value otherwise."""

import math

import pytest
import torch
from opacus.accountants import create_accountant

from flashnorm import FlashNormPrivacyEngine
from tests.grad_sample.guarantee import C, MODES, batch, make_private, probe, step

ACCOUNTANTS = ("rdp", "gdp", "prv")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])  # Opacus's GDP accountant refuses a change of σ
@pytest.mark.parametrize("mode", MODES)
def test_epsilon_after_sigma_set_to_zero_on_the_optimizer_is_inf(accountant, mode):
    private = make_private(probe(), mode, clip=C, sigma=1.0, engine=FlashNormPrivacyEngine(accountant=accountant))
    step(private, *batch(4, seed=1))
    assert math.isfinite(private.engine.get_epsilon(1e-5))
    private.optimizer.zero_grad()
    private.optimizer.noise_multiplier = 0.0
    step(private, *batch(4, seed=2))
    assert private.engine.accountant.history[-1][0] == 0.0
    assert private.engine.get_epsilon(1e-5) == math.inf
    private.optimizer.zero_grad()
    private.optimizer.noise_multiplier = 1.0  # noise again: the step without noise stays in the history
    step(private, *batch(4, seed=3))
    assert private.engine.get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_epsilon_of_a_run_made_private_with_sigma_zero_is_inf(accountant):
    private = make_private(probe(), "flash_fuse", clip=C, sigma=0.0,
                           engine=FlashNormPrivacyEngine(accountant=accountant))
    assert private.engine.get_epsilon(1e-5) == 0.0  # no step yet
    step(private, *batch(4, seed=1))
    assert private.engine.get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_epsilon_with_noise_is_opacus_value(accountant):
    engine = FlashNormPrivacyEngine(accountant=accountant)
    engine.accountant.history = [(1.1, 0.01, 50), (0.9, 0.01, 20)]
    theirs = create_accountant(accountant)
    theirs.history = list(engine.accountant.history)
    assert engine.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-9)
