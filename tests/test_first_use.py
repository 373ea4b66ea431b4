"""What a newcomer's first loop runs into: the DP loss answers ``item()``/``float()``/``mean()`` as a loss tensor
does (or says what to use) without ever giving up the clipped backward; Opacus-style 3-value unpacking explains
the 4-tuple; a forgotten ``shape=`` for token-level losses says so; and Opacus's "Optimal order is the largest
alpha" warning, about orders the user never chose, is not printed."""

import warnings

import pytest
import torch
import torch.nn as nn
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from flashnorm.accounting import MAX_ORDER, MIN_ORDER, rdp_spent
from flashnorm.criterion import DPTensorFastGradientClipping
from flashnorm.made_private import MadePrivate, MadePrivateOpacus
from tests.conftest import CLIPPING_MODES
from tests.oracle import microbatch_reference
from tests.test_privacy_engine import private, small_model

# Opacus's own calls here warn (that is what some tests check first); FlashNorm's are recorded with every filter off.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")


def _batch(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


# -- the DP loss as a loss tensor ----------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_item_float_and_format_give_the_reported_loss(reduction):
    x, y = _batch()
    _, dp_model, _, criterion, _ = private(small_model(), mode="flash_fuse", x=x, y=y, reduction=reduction, n=4)
    loss = criterion(dp_model(x), y)
    per_sample = loss.loss_per_sample.detach()
    value = (per_sample.mean() if reduction == "mean" else per_sample.sum()).item()
    assert loss.item() == float(loss) == value
    assert isinstance(float(loss), float)
    assert f"{loss:.4f}" == f"{value:.4f}"
    assert not loss.detach().requires_grad and loss.detach().dim() == 0


@pytest.mark.parametrize("reduce", ["mean", "sum", "mean().sum"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_mean_and_sum_return_the_dp_loss_whose_backward_clips(mode, reduce):
    """``loss.mean().backward()`` (the habit of a loop written for a reduction='none' loss) leaves the clipped sum
    Σ_b c_b ∇ℓ_b in ``p.grad``, as ``loss.backward()`` does: compared with the float64 oracle at a C that clips."""
    torch.manual_seed(0)
    model, (x, y), clip = small_model(), _batch(), 0.05
    oracle = microbatch_reference(model, x, y, lambda out, target: nn.functional.cross_entropy(out, target), clip)
    _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, x=x, y=y, clip=clip, n=4)
    loss = criterion(dp_model(x), y)
    reduced = loss
    for name in reduce.replace("()", "").split("."):
        reduced = getattr(reduced, name)()
    assert reduced is loss
    reduced.backward()
    assert oracle.norms.max() > 2 * clip  # clipping matters
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), oracle.clipped_sum[name], rtol=1e-5, atol=1e-7)


def test_tensor_attributes_the_dp_loss_lacks_say_what_to_use():
    x, y = _batch()
    _, dp_model, _, criterion, _ = private(small_model(), mode="flash_fuse", x=x, y=y, n=4)
    loss = criterion(dp_model(x), y)
    for use in (lambda: loss.cpu(), lambda: loss.grad_fn, lambda: loss.to("cpu"), lambda: loss.requires_grad):
        with pytest.raises(AttributeError, match=r"not a tensor.*loss\.item\(\).*loss\.backward\(\) runs the clipping"):
            use()
    assert not hasattr(loss, "grad_fn")
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        loss.no_such_thing
    with pytest.raises(TypeError, match=r"loss\.mean\(\) takes no arguments.*returns it unchanged"):
        loss.mean(dim=0)
    with pytest.raises(TypeError, match=r"loss\.sum\(\) takes no arguments"):
        loss.sum(0)
    loss.backward()  # still usable after the refusals


def test_arithmetic_then_mean_stays_a_dp_loss():
    x, y = _batch()
    _, dp_model, _, criterion, _ = private(small_model(), mode="flash", x=x, y=y, n=4)
    loss = (0.5 * criterion(dp_model(x), y) + 1.0).mean()
    assert type(loss) is DPTensorFastGradientClipping
    loss.backward()


# -- unpacking make_private's result ---------------------------------------------------------------------
def _make_private(mode, engine=None, epsilon=None):
    x, y = _batch(16)
    model = small_model()
    kwargs = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
                  data_loader=DataLoader(TensorDataset(x, y), batch_size=4), max_grad_norm=1.0, grad_sample_mode=mode)
    engine = engine or FlashNormPrivacyEngine()
    if epsilon is None:
        return engine.make_private(noise_multiplier=1.0, **kwargs)
    return engine.make_private_with_epsilon(target_epsilon=epsilon, target_delta=1e-5, epochs=1, **kwargs)


@pytest.mark.parametrize("epsilon", [None, 8.0])
@pytest.mark.parametrize("mode", ["flash_fuse", "ghost"])
def test_three_value_unpacking_in_a_clipping_mode_explains_the_four(mode, epsilon):
    with pytest.raises(ValueError, match=r"make_private returned 4 values, not 3: model, optimizer, criterion, "
                                         r"data_loader = engine\.make_private"):
        model, optimizer, loader = _make_private(mode, epsilon=epsilon)


@pytest.mark.parametrize("mode", ["flash_fuse", "ghost"])
def test_four_values_unpack_index_and_name(mode):
    result = _make_private(mode)
    assert type(result) is MadePrivate and isinstance(result, tuple) and len(result) == 4
    model, optimizer, criterion, loader = result
    assert (model, optimizer, criterion, loader) == tuple(result) == (result.module, result.optimizer,
                                                                       result.criterion, result.data_loader)
    assert result[2] is criterion and result[-1] is loader
    first, *rest = result
    assert first is model and rest == [optimizer, criterion, loader]
    x, y = _batch()
    criterion(model(x), y).backward()


def test_opacus_modes_return_three_and_explain_four_value_unpacking():
    result = _make_private("hooks")
    assert type(result) is MadePrivateOpacus and len(result) == 3
    model, optimizer, loader = result
    with pytest.raises(ValueError, match=r"make_private returned 3 values, not 4: .*return no criterion"):
        model, optimizer, criterion, loader = _make_private("hooks")


# -- a forgotten shape= ------------------------------------------------------------------------------
class TokenModel(nn.Module):
    """Embedding → Linear over T tokens: logits [B, T, V]; ``reentrant``: the whole model in one reentrant
    checkpoint (the layers' batch size is unknown until the recompute)."""

    def __init__(self, vocab=11, reentrant=False):
        super().__init__()
        self.embed, self.head, self.reentrant = nn.Embedding(vocab, 8), nn.Linear(8, vocab), reentrant

    def forward(self, tokens):
        h = self.embed(tokens)
        if self.reentrant:  # (the embedding is frozen: its output is a leaf that the checkpoint needs to track)
            return checkpoint(self.head, h.requires_grad_(), use_reentrant=True)
        return self.head(h)


def _token_step(reentrant=False, mode="flash_fuse", batch=4, steps=5, vocab=11):
    model = TokenModel(vocab, reentrant)
    if reentrant:  # every layer inside the checkpoint
        model.embed.weight.requires_grad_(False)
    x, y = torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))
    _, dp_model, _, criterion, _ = private(model, mode=mode, x=x, y=y, n=batch, batch_size=batch)
    return dp_model(x), y, criterion


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_forgotten_shape_for_token_losses_says_so(mode, reentrant):
    logits, y, criterion = _token_step(reentrant, mode)
    with pytest.raises(ValueError, match=r"returned 20 losses for the model's batch of 4 samples, 5 per sample.*"
                                         r"shape=\(B, T, V\)"):
        criterion(logits.reshape(-1, 11), y.reshape(-1))
    criterion(logits.reshape(-1, 11), y.reshape(-1), shape=tuple(logits.shape)).backward()  # the fix works


def test_shape_that_does_not_match_the_flattened_logits_says_so():
    logits, y, criterion = _token_step()
    with pytest.raises(ValueError, match=r"shape=\(4, 5, 11\).*B·T = 4·5 = 20 values.*holds \(16,\).*T - 1"):
        criterion(logits[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1), shape=(4, 5, 11))
    with pytest.raises(ValueError, match=r"shape=\(4,\): pass the logits' shape before flattening"):
        criterion(logits.reshape(-1, 11), y.reshape(-1), shape=(4,))
    criterion(logits[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1), shape=(4, 4, 11)).backward()


# -- Opacus's optimal-order warning ---------------------------------------------------------------------
#: Histories (σ, q, steps) where Opacus's default orders put the optimum at the largest one (small ε).
EDGE_HISTORIES = [[(5.0, 0.01, 100)], [(20.0, 0.01, 100)], [(100.0, 0.001, 1000)]]


def _warns_optimal_order(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if "Optimal order is the" in str(w.message)]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("history", EDGE_HISTORIES)
def test_get_epsilon_prints_no_optimal_order_warning(accountant, history):
    theirs = create_accountant(accountant)
    theirs.history = list(history)
    _, warned = _warns_optimal_order(lambda: theirs.get_epsilon(1e-5))
    assert warned, "Opacus no longer warns here: the case tests nothing"
    engine = FlashNormPrivacyEngine(accountant=accountant)
    engine.accountant.history = list(history)
    ours, warned = _warns_optimal_order(lambda: engine.get_epsilon(1e-5))
    assert not warned
    assert 0 < ours <= theirs.get_epsilon(1e-5)
    if accountant == "prv":  # silenced only: PRV's ε does not depend on the orders
        assert ours == theirs.get_epsilon(1e-5)


@pytest.mark.parametrize("history", EDGE_HISTORIES + [[(1.0, 0.064, 234)], [(0.3, 0.5, 10)], [(1.1, 0.01, 50)]])
def test_rdp_orders_extend_until_the_optimum_is_interior(history):
    accountant = create_accountant("rdp")
    accountant.history = list(history)
    eps, best, orders = rdp_spent(accountant, 1e-5)
    assert orders[0] < best < orders[-1] and MIN_ORDER <= orders[0] and orders[-1] <= MAX_ORDER
    # the minimum over the searched orders, Opacus's own conversion, which every order bounds validly
    assert eps == pytest.approx(accountant.get_privacy_spent(delta=1e-5, alphas=orders)[0], rel=1e-12)
    default_eps, default_best = accountant.get_privacy_spent(delta=1e-5)
    assert eps <= default_eps
    if accountant.DEFAULT_ALPHAS[0] < default_best < accountant.DEFAULT_ALPHAS[-1]:
        assert eps == default_eps  # Opacus's value whenever its optimum was interior


def test_a_users_own_orders_still_warn():
    engine = FlashNormPrivacyEngine(accountant="rdp")
    engine.accountant.history = list(EDGE_HISTORIES[0])
    _, warned = _warns_optimal_order(lambda: engine.accountant.get_epsilon(1e-5, alphas=[2, 4, 8]))
    assert warned


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_make_private_with_epsilon_as_the_quick_start_prints_no_warning_and_keeps_opacus_sigma(accountant):
    """The quick start's accounting: ε = 4 at δ = 1e-5 over 15 epochs at q = 1/16, then ε read every epoch."""
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = small_model()
    engine = FlashNormPrivacyEngine(accountant=accountant)
    (dp_model, optimizer, criterion, loader), warned = _warns_optimal_order(lambda: engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4), target_epsilon=4.0, target_delta=1e-5,
        epochs=15, max_grad_norm=1.0, grad_sample_mode="flash_fuse"))
    assert not warned
    assert optimizer.noise_multiplier == get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5,
                                                              sample_rate=1 / 16, epochs=15, accountant=accountant)
    engine.accountant.history = [(optimizer.noise_multiplier, 1 / 16, 15 * 16)]  # the 15 epochs
    epsilon, warned = _warns_optimal_order(lambda: engine.get_epsilon(1e-5))
    assert not warned and 3.9 < epsilon <= 4.0



def test_dptrainer_run_with_a_target_epsilon_prints_no_warning(tmp_path):
    pytest.importorskip("transformers")
    from flashnorm.integrations.transformers import PrivacyArguments
    from tests.integrations.test_transformers import lm_rows, make_trainer, tiny_gpt2

    trainer = make_trainer(tiny_gpt2(), lm_rows(16), tmp_path, PrivacyArguments(target_epsilon=4.0, target_delta=1e-5),
                           per_device_train_batch_size=4, max_steps=3, logging_steps=1)
    _, warned = _warns_optimal_order(trainer.train)
    assert not warned, [str(w.message) for w in warned]
