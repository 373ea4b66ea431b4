"""``get_epsilon`` after a step without noise: ``inf`` for every accountant (Opacus's GDP and PRV accountants raise
on σ = 0), and Opacus's value otherwise."""

import math

import pytest
import torch
import torch.nn as nn
from opacus.accountants import create_accountant
from torch.utils.data import DataLoader, TensorDataset

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


@pytest.mark.parametrize("mode", ["flash_fuse", "ghost"])
def test_the_accountant_records_the_rate_the_poisson_sampler_draws_at(mode):
    """99 batches per epoch: the Poisson loader samples at q = 1/99, and its length int(1/q) is 98 (1/(1/99) =
    98.99…). The accountant must record 1/99, not 1 / len(its loader) = 1/98 (which would overstate ε)."""
    data = TensorDataset(torch.randn(99 * 16, 3), torch.randint(0, 2, (99 * 16,)))
    model = nn.Linear(3, 2)
    engine = FlashNormPrivacyEngine()
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
    )
    assert loader.batch_sampler.sample_rate == 1 / 99
    x, y = data[:5]
    criterion(model(x), y).backward()
    optimizer.step()
    assert engine.accountant.history == [(1.0, 1 / 99, 1)]


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_a_bare_accountants_epsilon_follows_the_engines_rules(name):
    """`flashnorm.accounting.epsilon` (what the engine and DPTrainer's budget read): 0 before any step, inf once a
    step had σ = 0 (Opacus's PRV raises there; its GDP accountant refuses a change of σ at the step itself)."""
    from flashnorm.accounting import epsilon

    accountant = create_accountant(name)
    assert epsilon(accountant, 1e-5) == 0.0
    accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    assert 0 < epsilon(accountant, 1e-5) < math.inf
    accountant.step(noise_multiplier=0.0, sample_rate=0.01)
    assert epsilon(accountant, 1e-5) == math.inf
