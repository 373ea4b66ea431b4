"""DESIGN §7: every path either keeps each sample's contribution ≤ C exactly, or raises before any parameter changes.

"Influence" is measured as an attacker would: with noise 0, the norm of the summed clipped gradient with a
sample minus without it, on adversarial samples (huge inputs, wrong labels).
"""

import copy

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine as OpacusPrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from tests.oracle import microbatch_reference
from tests.zoo import MeanOver

MODES = ("ghost", "flash", "flash_fuse")
def SUM_LOSS(out, target):  # noqa: N802 - the oracle's per-sample loss
    return nn.functional.cross_entropy(out, target, reduction="sum")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), MeanOver(1), nn.Linear(5, 3)).double()


def _data(n=8, t=5):
    torch.manual_seed(1)
    return torch.randn(n, t, 6, dtype=torch.float64), torch.randint(0, 3, (n,))


def _private(model, mode, x, y, *, clip=1.0, sigma=0.0, batch_size=4, reduction="sum", engine=None, lr=1.0):
    engine = engine or FlashNormPrivacyEngine()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    return engine, *engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
        criterion=nn.CrossEntropyLoss(reduction=reduction), noise_multiplier=sigma, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode=mode, loss_reduction=reduction,
    )


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} changed"


def _summed_clipped(mode, model, x, y, clip, **kwargs):
    """Σ_b c_b ∇ℓ_b that one DP step (noise 0, sum) applies, as a flat vector."""
    model = copy.deepcopy(model)
    _, dp_model, dp_opt, criterion, _ = _private(model, mode, x, y, clip=clip, batch_size=x.shape[0], **kwargs)
    criterion(dp_model(x), y).backward()
    dp_opt.step()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 4])
def test_influence_of_an_adversarial_sample_is_at_most_c(mode, batch):
    """Huge inputs and a wrong label: the sample's influence on the step is ≤ C, whatever B."""
    model = _model()
    x, y = _data(batch + 1, t=7)
    x[-1] *= 1e4
    y[-1] = (y[-1] + 1) % 3
    clip = 0.5
    with_it = _summed_clipped(mode, model, x, y, clip)
    without = _summed_clipped(mode, model, x[:-1], y[:-1], clip)
    assert (with_it - without).norm() <= clip * (1 + 1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["eval", "hooks_disabled", "second_backward"])
def test_a_backward_whose_forward_captured_nothing_raises(mode, how):
    """A validation forward (model.train() forgotten), hooks disabled, or a loss back-propagated twice: the
    stale batch size of the previous step must not hide that nothing was captured (norms would read 0)."""
    model = _model()
    x, y = _data()
    _, dp_model, dp_opt, criterion, _ = _private(model, mode, x, y)
    criterion(dp_model(x[:4]), y[:4]).backward()
    dp_opt.step()
    dp_opt.zero_grad()
    before = _params(model)
    if how == "eval":
        dp_model.eval()
        loss = criterion(dp_model(x[4:]), y[4:])
    elif how == "hooks_disabled":
        dp_model.disable_hooks()
        loss = criterion(dp_model(x[4:]), y[4:])
    else:
        loss = criterion(dp_model(x[4:]), y[4:])
        loss.backward()
        dp_opt.zero_grad()
    with pytest.raises(RuntimeError, match="No captured forward pass"):
        loss.backward()
    _assert_unchanged(model, before)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 4])
def test_a_plain_backward_gives_norms_but_the_optimizer_refuses_its_gradients(mode, batch):
    """``nn.CrossEntropyLoss()(out, y).backward()`` (HF's ``outputs.loss.backward()``): the per-sample norms are
    computed as Opacus's module computes them, and ``optimizer.step()`` refuses the unclipped gradients."""
    model = _model()
    x, y = _data(batch, t=5)
    oracle = microbatch_reference(model, x, y, SUM_LOSS, 1.0)
    _, dp_model, dp_opt, criterion, _ = _private(model, mode, x, y, batch_size=batch)
    nn.functional.cross_entropy(dp_model(x), y, reduction="sum").backward()
    if batch > 1:  # a batch of one takes PyTorch's plain path: its gradient is the sample's own
        torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)
    before = _params(model)
    with pytest.raises(RuntimeError, match="not produced by the clipping workflow"):
        dp_opt.step()
    _assert_unchanged(model, before)
    dp_opt.zero_grad()  # then the workflow works again
    criterion(dp_model(x), y).backward()
    dp_opt.step()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 4])
def test_a_layer_unfrozen_after_make_private_is_clipped(mode, batch):
    """Progressive unfreezing: the optimizer holds every parameter; the first layer, frozen at make_private, is
    unfrozen later. Its gradient is clipped with the rest, exactly, on every path (B = 1 included)."""
    model = _model()
    model[0].requires_grad_(False)
    x, y = _data(batch, t=5)
    _, dp_model, dp_opt, criterion, _ = _private(model, mode, x, y, clip=0.1, batch_size=batch)
    criterion(dp_model(x), y).backward()
    dp_opt.step()
    dp_opt.zero_grad()
    model[0].requires_grad_(True)
    reference = _model()  # the oracle's copy, without the wrapper's hooks
    reference.load_state_dict(model.state_dict())
    oracle = microbatch_reference(reference, x, y, SUM_LOSS, 0.1)
    criterion(dp_model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "sigma,clip", [(1.0, float("inf")), (1.0, float("nan")), (1.0, 0.0), (-1.0, 1.0), (float("nan"), 1.0),
                   (float("inf"), 1.0)]
)
def test_invalid_privacy_parameters_are_refused_before_wrapping(mode, sigma, clip):
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match="noise_multiplier|max_grad_norm"):
        _private(model, mode, x, y, sigma=sigma, clip=clip)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), "the model was wrapped"


@pytest.mark.parametrize("sigma,clip", [(1.0, float("inf")), (-0.5, 1.0)])
def test_the_optimizer_refuses_invalid_privacy_parameters(sigma, clip):
    from flashnorm.optimizers import DPOptimizerFastGradientClipping

    with pytest.raises(ValueError, match="noise_multiplier|max_grad_norm"):
        DPOptimizerFastGradientClipping(torch.optim.SGD(_model().parameters(), lr=1.0), noise_multiplier=sigma,
                                        max_grad_norm=clip, expected_batch_size=4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_k_backward_calls_before_one_step_sum_and_are_accounted_k_times(mode, reduction):
    """Manual gradient accumulation: two micro-batches, two backward calls, one step. The update sums both
    clipped sums and divides by 2 × the expected batch size (mean); the accountant records 2 × the sample rate,
    as Opacus's hooks mode does."""
    model = _model()
    x, y = _data(8, t=5)
    start = _params(model)
    oracle = microbatch_reference(model, x, y, SUM_LOSS, 0.1)
    engine, dp_model, dp_opt, criterion, loader = _private(model, mode, x, y, clip=0.1, reduction=reduction)
    for half in (slice(0, 4), slice(4, 8)):
        criterion(dp_model(x[half]), y[half]).backward()
    dp_opt.step()
    scale = 1 / (2 * 4) if reduction == "mean" else 1.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), start[name] - scale * oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)
    assert engine.accountant.history == [(0.0, 2 * (1 / len(loader)), 1)]


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_micro_batch_keeps_the_earlier_ones(mode):
    """A non-finite loss in the second micro-batch raises and leaves the first micro-batch's clipped sum."""
    model = _model()
    x, y = _data(8, t=5)
    _, dp_model, dp_opt, criterion, _ = _private(model, mode, x, y, clip=0.1)
    criterion(dp_model(x[:4]), y[:4]).backward()
    first = [p.grad.clone() for p in model.parameters()]
    bad = x[4:].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        criterion(dp_model(bad), y[4:]).backward()
    for p, g in zip(model.parameters(), first):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_signal_skip_step_matches_opacus_hooks_mode(mode, reduction):
    """Virtual batches (``signal_skip_step``, what ``BatchMemoryManager`` does): the same update and the same
    accountant history as Opacus's hooks mode."""
    x, y = _data(8, t=5)
    results = []
    for engine, grad_mode in ((OpacusPrivacyEngine(), "hooks"), (FlashNormPrivacyEngine(), mode)):
        model = _model()
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        out = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
            criterion=nn.CrossEntropyLoss(reduction=reduction), noise_multiplier=0.0, max_grad_norm=0.1,
            poisson_sampling=False, grad_sample_mode=grad_mode, loss_reduction=reduction,
        )
        dp_model, dp_opt = out[0], out[1]
        loss_fn = out[2] if len(out) == 4 else nn.CrossEntropyLoss(reduction=reduction)
        for half, skip in ((slice(0, 4), True), (slice(4, 8), False)):
            if skip:
                dp_opt.signal_skip_step(True)
            loss_fn(dp_model(x[half]), y[half]).backward()
            dp_opt.step()
            dp_opt.zero_grad()
        results.append((_params(model), list(engine.accountant.history)))
    (theirs, their_history), (ours, our_history) = results
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-10, atol=1e-12)
    assert our_history == their_history


class _Residual(nn.Module):
    """torchvision's BasicBlock pattern: in-place ops on hooked layers' outputs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 6), nn.GroupNorm(2, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.norm(self.fc1(x).transpose(1, 2))).transpose(1, 2)  # ReLU in place on GroupNorm's output
        out = self.fc2(out)
        out += x  # in place on a Linear's output
        return self.head(self.relu(out).mean(dim=1))


@pytest.mark.parametrize("mode", MODES)
def test_in_place_ops_on_a_hooked_layer_output_are_exact(mode):
    torch.manual_seed(0)
    model = _Residual().double()
    x, y = _data(4, t=5)
    oracle = microbatch_reference(model, x, y, SUM_LOSS, 0.1)
    _, dp_model, dp_opt, criterion, _ = _private(model, mode, x, y, clip=0.1)
    criterion(dp_model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)


class _InfGradient(torch.autograd.Function):
    """Identity whose backward overflows for the first sample (as an fp16 overflow would): the loss is finite,
    the first sample's norm is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    overflow = False

    @staticmethod
    def backward(ctx, g):
        if not _InfGradient.overflow:
            return g
        g = g.clone()
        g[0] = float("inf")
        return g


class _Overflowing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(_InfGradient.apply(torch.tanh(self.fc(x))).mean(dim=1))


@pytest.mark.parametrize("mode", MODES)
def test_a_non_finite_norm_refuses_the_step_and_keeps_earlier_gradients(mode):
    """A finite loss whose backward overflows for one sample: its norm is inf, c_b would be 0 and 0·inf = NaN
    would reach every other sample's gradient. The step raises; the earlier micro-batch's clipped sum stays."""
    torch.manual_seed(0)
    model = _Overflowing().double()
    x, y = _data(8, t=5)
    _, dp_model, dp_opt, criterion, _ = _private(model, mode, x, y, clip=0.1)
    criterion(dp_model(x[:4]), y[:4]).backward()
    first = {name: p.grad.clone() for name, p in model.named_parameters()}
    _InfGradient.overflow = True
    try:
        with pytest.raises(ValueError, match="not finite"):
            criterion(dp_model(x[4:]), y[4:]).backward()
    finally:
        _InfGradient.overflow = False
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, first[name]), name


class _ScaledGate(nn.Module):
    """No FlashNorm rule and no Opacus grad sampler: the per-sample fallback. Its output depends on a keyword
    argument and on an attribute that changes after make_private."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5))
        self.power = 1

    def forward(self, x, *, scale):
        return (x * self.weight) ** self.power * scale


class _GateModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gate, self.head = nn.Linear(6, 5), _ScaledGate(), nn.Linear(5, 3)

    def forward(self, x):
        scale = 1000.0 * torch.ones(x.shape[0], 1, 1, dtype=x.dtype)
        return self.head(torch.tanh(self.gate(torch.tanh(self.fc(x)), scale=scale)).mean(dim=1))


@pytest.mark.parametrize("mode", MODES)
def test_the_fallback_differentiates_the_call_that_ran(mode):
    """Keyword arguments and attributes changed after make_private reach the per-sample fallback: it re-runs
    the live module with the whole call, not a copy made at make_private with the first input alone."""
    torch.manual_seed(0)
    model = _GateModel().double()
    x, y = _data(4, t=5)
    _, dp_model, dp_opt, criterion, _ = _private(model, mode, x, y, clip=0.1)
    model.gate.power = 2
    reference = _GateModel().double()
    reference.load_state_dict(model.state_dict())
    reference.gate.power = 2
    oracle = microbatch_reference(reference, x, y, SUM_LOSS, 0.1)
    criterion(dp_model(x), y).backward()
    torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)
