"""The README's guarantees, one section per promise, in every clipping mode: every step either keeps each sample's
contribution ≤ C exactly, or raises before any parameter changes (`tests.grad_sample.guarantee`).

"Influence" is measured as an attacker would: with noise 0, the update with a sample minus the update without it,
on adversarial samples (huge inputs, chosen output gradients, wrong labels). float64 rows also require the step
to apply the float64 oracle's Σ_b c_b ∇ℓ_b exactly; float32 rows (Gram cancellation, absorption) require the bound
only. The randomised misuses of the zoo's models are in test_misuse.py.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus import PrivacyEngine as OpacusPrivacyEngine
from opacus.schedulers import ExponentialGradClip

from tests.grad_sample.guarantee import (
    C, MODES, NEVER, NO_CAPTURE, NOT_CLIPPED, Attempt, LinearLoss, adversarial, assert_unchanged, batch,
    influence, make_private, oracle, probe, reference, run, sized, snapshot, step, step_on, virtual_steps,
    without_last,
)
from tests.oracle import microbatch_reference
from tests.zoo import MeanOver


# -- the classifier scenario: cross-entropy on labels ---------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), MeanOver(1), nn.Linear(5, 3)).double()


def _data(n=8, t=5):
    torch.manual_seed(1)
    return torch.randn(n, t, 6, dtype=torch.float64), torch.randint(0, 3, (n,))


def _classifier_private(model, mode, x, y, *, clip=1.0, reduction="sum", **kwargs):
    return make_private(model, mode, clip=clip, data=(x, y), reduction=reduction,
                        criterion=nn.CrossEntropyLoss(reduction=reduction), **kwargs)


# -- the measure -----------------------------------------------------------------------------------------------
def test_the_adversarial_sample_is_far_outside_the_bound():
    """The rows below would notice an unclipped step: the adversarial sample's gradient norm is ≫ C."""
    (x, g), _ = adversarial()
    norms = microbatch_reference(probe(), x, g, lambda out, t: (out * t).sum(), C).norms
    assert norms[-1] > 1e3 * C and norms[:-1].max() < norms[-1] / 100


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_influence_of_an_adversarial_sample_is_at_most_c(mode, batch_size):
    """Huge inputs and a wrong label: the sample's influence on the step is ≤ C, whatever B."""
    x, y = _data(batch_size + 1, t=7)
    x[-1] *= 1e4
    y[-1] = (y[-1] + 1) % 3

    def make(b):
        model = _model()
        private = _classifier_private(model, mode, *b, clip=0.5, batch_size=len(b[0]))
        return Attempt(model, lambda: step(private, *b))

    assert influence(make, without_last(x, y), clip=0.5) is not None


# -- invalid max_grad_norm / noise_multiplier ----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "sigma,clip", [(1.0, float("inf")), (1.0, float("nan")), (1.0, 0.0), (-1.0, 1.0), (float("nan"), 1.0),
                   (float("inf"), 1.0)]
)
def test_invalid_privacy_parameters_are_refused_before_wrapping(mode, sigma, clip):
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match="noise_multiplier|max_grad_norm"):
        _classifier_private(model, mode, x, y, sigma=sigma, clip=clip)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), "the model was wrapped"


@pytest.mark.parametrize("sigma,clip", [(1.0, float("inf")), (-0.5, 1.0)])
def test_the_optimizer_refuses_invalid_privacy_parameters(sigma, clip):
    from flashnorm.optimizers import DPOptimizerFastGradientClipping

    with pytest.raises(ValueError, match="noise_multiplier|max_grad_norm"):
        DPOptimizerFastGradientClipping(torch.optim.SGD(_model().parameters(), lr=1.0), noise_multiplier=sigma,
                                        max_grad_norm=clip, expected_batch_size=4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,value", [("noise_multiplier", -1.0), ("noise_multiplier", float("nan")),
                                        ("noise_multiplier", float("inf")), ("max_grad_norm", float("nan")),
                                        ("max_grad_norm", float("inf")), ("max_grad_norm", 0.0)])
def test_invalid_privacy_parameters_set_on_the_optimizer_are_refused(mode, name, value):
    (x, g), _ = adversarial()
    model = probe()
    private = make_private(model, mode, clip=C, sigma=1.0)
    setattr(private.optimizer, name, value)
    before = snapshot(model)
    with pytest.raises((RuntimeError, ValueError), match=name):
        step(private, x, g)
    assert_unchanged(model, before)


@pytest.mark.parametrize("mode", MODES)
def test_a_grad_clip_scheduler_changes_the_bound_that_is_applied(mode):
    def make(b):
        private = make_private(probe(), mode, clip=C)
        ExponentialGradClip(private.optimizer, gamma=0.1).step()
        assert private.optimizer.max_grad_norm == pytest.approx(0.1 * C)
        return step_on(private, *b, exact_at=0.1 * C)

    influence(make, adversarial(), clip=0.1 * C, refusal="max_grad_norm")


# -- a loss not built with the returned criterion ------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["plain", "plain_mean", "plain_after_dp_backward"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_plain_backward_gives_norms_but_the_optimizer_refuses_its_gradients(mode, how, batch_size):
    """``(out * G).sum().backward()`` (``nn.CrossEntropyLoss()(out, y)``, HF's ``outputs.loss``), also as a mean
    or after a DP backward of the same step (the plain gradient adds to the clipped one): the backward computes
    the per-sample norms as Opacus's module computes them, ``optimizer.step()`` refuses the unclipped gradients,
    and after ``zero_grad()`` the workflow works again."""
    made = []

    def make(b):
        x, g = b
        model = probe()
        private = make_private(model, mode, clip=C)
        if how == "plain_after_dp_backward":
            private.criterion(private.model(x), g).backward()
        LinearLoss("mean" if how == "plain_mean" else "sum")(private.model(x), g).backward()
        if how == "plain" and len(x) > 1:  # a batch of one takes PyTorch's plain path: its gradient is the sample's own
            norms = reference(private.model, x, g, C).norms
            torch.testing.assert_close(private.model.get_norm_sample(), norms, rtol=1e-10, atol=1e-12)
        made.append((private, x, g))
        return Attempt(model, private.optimizer.step)

    assert influence(make, sized(batch_size), refusal=NOT_CLIPPED, errors=RuntimeError) is None
    private, x, g = made[0]
    private.optimizer.zero_grad()  # then the workflow works again
    step(private, x, g)


# -- a backward whose forward captured nothing ---------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["eval", "hooks_disabled", "second_backward"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_backward_whose_forward_captured_nothing_raises(mode, how, batch_size):
    """After a step of the same batch size: a validation forward (``model.train()`` forgotten), hooks disabled,
    or a loss back-propagated twice. The stale batch size of the previous step must not hide that nothing was
    captured (norms would read 0): the backward itself raises and every parameter stays as it was."""
    def make(b):
        x, g = b
        model = probe()
        private = make_private(model, mode, clip=C)
        step(private, *batch(batch_size, seed=2))
        private.optimizer.zero_grad()

        def act():  # ends with the backward that must raise (a step is never reached)
            if how == "second_backward":
                loss = private.criterion(private.model(x), g)
                loss.backward()
                private.optimizer.zero_grad()
            else:
                private.model.eval() if how == "eval" else private.model.disable_hooks()
                loss = private.criterion(private.model(x), g)
            loss.backward()
        return Attempt(model, act)

    assert influence(make, sized(batch_size), refusal=NO_CAPTURE, errors=RuntimeError) is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["eval", "hooks_disabled"])
def test_an_uncaptured_forward_after_an_unused_training_forward_is_refused_or_exact(mode, how):
    """A training forward whose loss is dropped, then the step's forward in eval mode (or with hooks disabled):
    the step reads no capture of the dropped forward; it is refused or applies the oracle's clipped sum."""
    def make(b):
        x, g = b
        model = probe()
        private = make_private(model, mode, clip=C)
        private.model(batch(len(x), seed=2)[0])
        private.model.eval() if how == "eval" else private.model.disable_hooks()
        return Attempt(model, lambda: step(private, x, g), expected=oracle(private.model, x, g, C))

    influence(make, adversarial(), refusal=NO_CAPTURE)


# -- requires_grad changed after make_private ----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["unfreeze", "freeze", "unfreeze_between_micro_batches"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_layer_frozen_or_unfrozen_after_make_private_is_clipped(mode, how, batch_size):
    """Progressive unfreezing (the optimizer holds every parameter): the first layer, frozen at make_private, is
    unfrozen after a step (or a trainable one frozen; or unfrozen between two micro-batches of one step). Its
    gradient is clipped with the rest, exactly, on every path (B = 1 included)."""
    layer = 2 if how == "freeze" else 0  # the layer whose requires_grad changes

    def make(b):
        x, g = b
        model = probe()
        model[layer].requires_grad_(how == "freeze")
        private = make_private(model, mode, clip=C)
        warm_x, warm_g = batch(batch_size, seed=2)
        if how == "unfreeze_between_micro_batches":
            expected = oracle(private.model, warm_x, warm_g, C)
            private.criterion(private.model(warm_x), warm_g).backward()
            model[layer].requires_grad_(True)
            expected = expected + oracle(private.model, x, g, C)
            return Attempt(model, lambda: step(private, x, g), expected=expected)
        step(private, warm_x, warm_g)
        private.optimizer.zero_grad()
        model[layer].requires_grad_(how != "freeze")
        return Attempt(model, lambda: step(private, x, g), expected=oracle(private.model, x, g, C))

    if how == "unfreeze_between_micro_batches":  # the influence of the sample of the second micro-batch
        influence(make, sized(batch_size), refusal="requires_grad")
    else:
        assert influence(make, sized(batch_size)) is not None


@pytest.mark.parametrize("mode", MODES)
def test_a_step_without_backward_after_unfreezing_adds_noise_only(mode):
    """Opacus's step of noise alone (no backward) after progressive unfreezing: with noise 0 nothing moves (or
    the step refuses, naming requires_grad)."""
    model = probe()
    model[0].requires_grad_(False)
    private = make_private(model, mode, clip=C)
    step(private, *batch(4, seed=2))
    private.optimizer.zero_grad()
    model[0].requires_grad_(True)
    applied = run(Attempt(model, private.optimizer.step), refusal="requires_grad")
    assert applied is None or not applied.any()


@pytest.mark.parametrize("mode", MODES)
def test_requires_grad_changed_between_forward_and_backward_is_refused(mode):
    (x, g), _ = adversarial()
    model = probe()
    model[0].requires_grad_(False)
    private = make_private(model, mode, clip=C)
    out = private.model(x)
    model[0].requires_grad_(True)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="requires_grad changed between the forward pass and the backward pass"):
        private.criterion(out, g).backward()
        private.optimizer.step()
    assert_unchanged(model, before)


# -- gradient accumulation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("sizes", [(4, 4), (4, 1), (1, 4), (4, 4, 4)])  # the adversarial sample in the last one
def test_k_backward_calls_before_one_step_sum_and_are_accounted_k_times(mode, reduction, sizes):
    """Manual gradient accumulation: micro-batches of these sizes, one ``backward()`` each, then one ``step()``
    (B = 1 takes the plain path). The update sums the k clipped sums and divides by k × the expected batch size
    (``mean``); the accountant records k × the sample rate, as Opacus's hooks mode does."""
    def make(b):
        x, g = b
        model = probe()
        private = make_private(model, mode, clip=C, reduction=reduction)
        expected = oracle(private.model, x, g, C)
        for i, size in enumerate(sizes[:-1]):
            wx, wg = batch(size, seed=10 + i)
            expected = expected + oracle(private.model, wx, wg, C)
            private.criterion(private.model(wx), wg).backward()
        scale = len(sizes) * 4 if reduction == "mean" else 1.0  # mean: the step divides by k × E

        def act():
            step(private, x, g)
            assert private.engine.accountant.history == [(0.0, len(sizes) * (1 / len(private.loader)), 1)]
        return Attempt(model, act, scale=scale, expected=expected)

    influence(make, sized(sizes[-1]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("skipped", [True, False])  # the adversarial sample in the skipped micro-batch or not
def test_signal_skip_step_matches_opacus_hooks_mode(mode, reduction, skipped):
    """Virtual batches: two micro-batches, the first after ``signal_skip_step(True)`` (what ``BatchMemoryManager``
    does), then one update of both clipped sums divided by the expected batch size of the logical batch
    (``mean``): the same update and the same accountant history as Opacus's hooks mode."""
    made = []

    def skip_then_step(private, first, second):
        private.optimizer.signal_skip_step(True)
        step(private, *first)  # skipped: accumulated
        private.optimizer.zero_grad()
        return lambda: step(private, *second)

    def make(b):
        model = probe()
        private = make_private(model, mode, clip=C, reduction=reduction)
        other = batch(4, seed=3)
        first, second = (b, other) if skipped else (other, b)
        made.append((model, private, first, second))
        expected = oracle(private.model, *first, C) + oracle(private.model, *second, C)
        scale = 4 if reduction == "mean" else 1.0  # the expected batch size (the logical batch's), as Opacus
        return Attempt(model, skip_then_step(private, first, second), scale=scale, expected=expected)

    assert influence(make, adversarial()) is not None
    for model, private, first, second in made:
        theirs = probe()
        opacus = make_private(theirs, "hooks", clip=C, reduction=reduction, engine=OpacusPrivacyEngine())
        skip_then_step(opacus, first, second)()
        ours = snapshot(model)
        for name, p in snapshot(theirs).items():
            torch.testing.assert_close(ours[name], p, rtol=1e-10, atol=1e-12)
        assert private.engine.accountant.history == opacus.engine.accountant.history


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_batch_memory_manager(mode, reduction):
    """One logical batch of 4 in physical batches of 2 and 2 (the adversarial sample in the last); one
    accountant step at the loader's sample rate."""
    def make(b):
        x, g = b
        model = probe()
        private = make_private(model, mode, clip=C, data=(x, g), batch_size=len(x), reduction=reduction)

        def act():
            virtual_steps(private, max_physical_batch_size=3)
            assert private.engine.accountant.history == [(0.0, 1.0, 1)]
        return Attempt(model, act, scale=len(x) if reduction == "mean" else 1.0,
                       expected=oracle(private.model, x, g, C))

    assert influence(make, adversarial()) is not None


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_micro_batch_keeps_the_earlier_ones(mode):
    """A non-finite loss in the second micro-batch raises and leaves the first micro-batch's clipped sum."""
    model = _model()
    x, y = _data(8, t=5)
    private = _classifier_private(model, mode, x, y, clip=0.1)
    private.criterion(private.model(x[:4]), y[:4]).backward()
    first = [p.grad.clone() for p in model.parameters()]
    bad = x[4:].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        private.criterion(private.model(bad), y[4:]).backward()
    for p, g in zip(model.parameters(), first):
        assert torch.equal(p.grad, g)


# -- a non-finite per-sample norm ----------------------------------------------------------------------------
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
    private = _classifier_private(model, mode, x, y, clip=0.1)
    private.criterion(private.model(x[:4]), y[:4]).backward()
    first = {name: p.grad.clone() for name, p in model.named_parameters()}
    _InfGradient.overflow = True
    try:
        with pytest.raises(ValueError, match="not finite"):
            private.criterion(private.model(x[4:]), y[4:]).backward()
    finally:
        _InfGradient.overflow = False
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, first[name]), name


# -- in-place ops on a hooked layer's output -----------------------------------------------------------------
class _InPlace(nn.Module):
    """``ReLU(inplace=True)`` on one Linear's output and ``out += x`` on another's (torchvision's ResNet blocks)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.relu = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out = self.fc2(self.relu(self.fc1(x)))
        out += x
        return self.head(self.relu(out))


class _Residual(nn.Module):
    """torchvision's BasicBlock pattern: ``ReLU(inplace=True)`` on GroupNorm's output, ``out += x`` on a Linear's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.norm, self.fc2 = nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.norm(self.fc1(x).transpose(1, 2))).transpose(1, 2)  # ReLU in place on GroupNorm's output
        out = self.fc2(out)
        out += x  # in place on a Linear's output
        return self.head(self.relu(out))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block", [_InPlace, _Residual], ids=["relu_on_linear", "relu_on_group_norm"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_in_place_ops_on_a_hooked_layer_output_are_exact(mode, block, batch_size):
    def make(b):
        x, g = b
        model = block().double()
        private = make_private(model, mode, clip=C)
        return Attempt(model, lambda: step(private, x, g), expected=oracle(private.model, x, g, C))

    assert influence(make, sized(batch_size)) is not None


# -- a parameter read outside its layer from step 2 on -------------------------------------------------------
class _Leaky(nn.Module):
    """Linear(4, 3); with ``leak`` one of its parameters is also read outside the layer: by ``F.linear`` (the weight),
    by an addition (the bias: an op that saves nothing for it) or by an embedding lookup (the weight: saves only
    the indices)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3).double()
        self.leak = None

    def forward(self, x):
        out = self.fc(x)
        if self.leak == "linear":
            return out + F.linear(x, self.fc.weight)
        if self.leak == "bias_add":
            return out + 10 * self.fc.bias
        if self.leak == "lookup":
            ids = torch.zeros(x.shape[:-1], dtype=torch.long)
            return out + 10 * F.embedding(ids, self.fc.weight)[..., :3]
        return out


@pytest.mark.parametrize("leak", ["linear", "bias_add", "lookup"])
@pytest.mark.parametrize("mode", MODES)
def test_a_parameter_read_outside_its_layer_from_step_two_on(mode, leak):
    """The check runs on every step, not on the first one alone: a read that starts on step two is refused (or
    the step applies the oracle's clipped sum)."""
    def make(b):
        x, g = b
        model = _Leaky()
        private = make_private(model, mode, clip=C)
        step(private, *batch(4, seed=2))
        private.optimizer.zero_grad()
        model.leak = leak
        return Attempt(model, lambda: step(private, x, g), expected=oracle(private.model, x, g, C))

    influence(make, adversarial(), refusal="outside that layer")


# -- the per-sample fallback ---------------------------------------------------------------------------------
class _Gate(nn.Module):
    """No norm rule (the per-sample fallback): x ⊙ w · scale · factor, ``factor`` a keyword argument."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1e-3 * torch.randn(3))  # small: this layer's gradient dominates the step's
        self.scale = 1.0

    def forward(self, x, factor=1.0):
        return x * self.weight * self.scale * factor


class _Gated(nn.Module):
    def __init__(self, keyword):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.gate, self.keyword = nn.Linear(4, 3), _Gate(), keyword

    def forward(self, x):
        h = self.fc(x)
        return self.gate(h, factor=1e3) if self.keyword else self.gate(h)


class _ScaledGate(nn.Module):
    """No norm rule (the per-sample fallback): (x ⊙ w)^power · scale, ``scale`` a keyword tensor of the batch."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5))
        self.power = 1

    def forward(self, x, *, scale):
        return (x * self.weight) ** self.power * scale


class _GateModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.gate, self.head = nn.Linear(4, 5), _ScaledGate(), nn.Linear(5, 3)

    def forward(self, x):
        scale = 1000.0 * torch.ones(x.shape[0], 1, 1, dtype=x.dtype)
        return self.head(torch.tanh(self.gate(torch.tanh(self.fc(x)), scale=scale)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["keyword_argument", "attribute_changed", "tensor_keyword_and_power_changed"])
def test_the_fallback_differentiates_the_call_that_ran(mode, how):
    """A layer without a norm rule called with a keyword argument (a number, or a tensor of the batch), or whose
    attribute changed after make_private: the per-sample fallback re-runs the live module with the whole call,
    not a copy made at make_private with the first input alone. Its norms and the step are the oracle's (the
    first two rows may refuse instead, naming the fallback)."""
    def make(b):
        x, g = b
        model = _GateModel() if how.startswith("tensor") else _Gated(keyword=how == "keyword_argument")
        model = model.double()
        private = make_private(model, mode, clip=C)
        if how == "attribute_changed":
            model.gate.scale = 1e3
        elif how.startswith("tensor"):
            model.gate.power = 2
        norms = reference(private.model, x, g, C).norms

        def act():
            private.criterion(private.model(x), g).backward()
            torch.testing.assert_close(private.model.get_norm_sample(), norms, rtol=1e-10, atol=1e-12)
            private.optimizer.step()
        return Attempt(model, act, expected=oracle(private.model, x, g, C))

    x, g = batch(4, seed=1)  # no input scaling needed: the fallback's own norm is 1e3x too small
    refusal = NEVER if how.startswith("tensor") else "fallback|per-sample"
    influence(make, without_last(x, g), refusal=refusal)


# -- float32: Gram cancellation and absorption ---------------------------------------------------------------
#: A float32 step may refuse, naming what it found (a norm estimate that is negative, not finite, or too inexact).
FLOAT32_REFUSAL = "negative|not finite|cancellation|rounding"


def _float32_batch(seed, rows, steps=None):
    """Three samples [3, T, 4] / [3, T, 3] float32; the last one's positions and output gradients are ``rows``,
    then zero rows up to ``steps`` (T > 32 takes the Gram form in float64)."""
    gen = torch.Generator().manual_seed(seed)
    steps = steps or len(rows[0])
    x = torch.randn(3, steps, 4, generator=gen)
    g = torch.randn(3, steps, 3, generator=gen)
    x[-1], g[-1] = 0.0, 0.0
    x[-1, :len(rows[0])], g[-1, :len(rows[1])] = torch.stack(rows[0]), torch.stack(rows[1])
    return without_last(x, g)


def _direction(gen, n, norm):
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    return (v / v.norm() * norm).float()


def _float32_influence(mode, make_model, batches, norm_method=None):
    def make(b):
        x, g = b
        model = make_model()  # float32
        private = make_private(model, mode, clip=C, norm_method=norm_method)
        return Attempt(model, lambda: step(private, x, g))

    return influence(make, batches, refusal=FLOAT32_REFUSAL)


@pytest.mark.parametrize("steps", [None, 40])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [1, 3])  # the float32 Gram estimate reads ≈ 0, < 0: the rounding bound clips
def test_float32_gram_cancellation(mode, seed, steps):
    """Positions x0 and x0 + d (|x0| = 1e6, |d| = 10), output gradients h and −h (|h| = 3): the sample's gradient
    −h dᵀ has norm 30, the Gram terms |x0|²|h|² ≈ 1e13 whose float32 rounding (≈ 1e6) swamps its square."""
    gen = torch.Generator().manual_seed(seed)
    x0, d, h = _direction(gen, 4, 1e6), _direction(gen, 4, 10.0), _direction(gen, 3, 3.0)
    true = torch.outer(h.double(), (x0 + d).double() - x0.double()).norm()
    assert true > 10 * C and torch.finfo(torch.float32).eps * 1e12 * 9 > true**2
    batches = _float32_batch(seed, ([x0, x0 + d], [h, -h]), steps)
    _float32_influence(mode, lambda: nn.Linear(4, 3), batches, None if mode == "ghost" else "gram")


@pytest.mark.parametrize("steps", [16, 31])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [1, 6])  # the float32 Gram estimate reads 0, < 0: the rounding bound clips
def test_float32_gram_cancellation_where_the_cpu_plan_takes_gram(mode, seed, steps, monkeypatch):
    """The Gram-cancellation input on a Linear(64, 256) at T ≤ 32, no method forced: on the GPU flash under-fills it
    and takes flash, on the CPU the planner takes Gram (T·(d + p) < d·p). The planned step keeps the sample's
    influence ≤ C (1 + 10⁻³), or refuses with θ unchanged."""
    from flashnorm.norms import linear

    grams = []
    gram = linear.gram_norm_sq
    monkeypatch.setattr(linear, "gram_norm_sq", lambda x, g, **k: grams.append(x.shape) or gram(x, g, **k))
    gen = torch.Generator().manual_seed(seed)
    x0, d, h = _direction(gen, 64, 1e6), _direction(gen, 64, 10.0), _direction(gen, 256, 3.0)
    x, g = torch.randn(3, steps, 64, generator=gen), torch.randn(3, steps, 256, generator=gen)
    x[-1], g[-1] = 0.0, 0.0
    x[-1, 0], x[-1, 1], g[-1, 0], g[-1, 1] = x0, x0 + d, h, -h
    _float32_influence(mode, lambda: nn.Linear(64, 256), without_last(x, g))
    assert grams and all(shape[1:] == (steps, 64) for shape in grams), "the planned norm took the Gram form"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("steps", [1, 17, 31, 37])
@pytest.mark.parametrize("mode", MODES)
def test_the_cpu_plan_is_exact_in_float32(mode, steps, reduction, monkeypatch):
    """Linear(64, 256) → tanh → Linear(256, 64) in float32, no method forced: at T ≤ 32 the CPU's plan takes Gram
    (T·(d + p) < d·p), at T = 37 flash (beyond Gram's float32 limit); one step applies the float64 microbatch
    oracle's Σ_b c_b ∇ℓ_b (over the expected batch size for ``mean``) within float32 tolerance, some samples
    clipped."""
    from flashnorm.norms import linear

    grams = []
    gram = linear.gram_norm_sq
    monkeypatch.setattr(linear, "gram_norm_sq", lambda x, g, **k: grams.append(x.shape[1]) or gram(x, g, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))
    gen = torch.Generator().manual_seed(steps)
    x, target = torch.randn(4, steps, 64, generator=gen), torch.randn(4, steps, 64, generator=gen)
    norms = reference(model, x, target, 1.0).norms.sort().values
    clip = float(norms[1:3].mean())  # two samples clipped, two not
    expected = oracle(model, x, target, clip)
    private = make_private(model, mode, clip=clip, reduction=reduction)
    # SGD(lr=1) on the clipped sum, over the expected batch size (4) for mean
    applied = run(Attempt(model, lambda: step(private, x, target), scale=4 if reduction == "mean" else 1), NEVER)
    off = float((applied - expected).norm() / expected.norm())  # float32 rounding of the sums, norm-wise
    assert off < 2e-6, off  # measured 1.4-2.7e-7: a few float32 ulps
    assert bool(grams) == (mode == "ghost" or steps <= 32), grams


@pytest.mark.parametrize("mode,norm_method", [
    ("ghost", None),
    ("flash", None),
    ("flash_fuse", "flash"),
    ("flash_fuse", "per_sample"),  # norm and applied gradient from the same per-sample bmm
])
@pytest.mark.parametrize("steps", [None, 40])
@pytest.mark.parametrize("x0_norm", [1e8, 1e10])
def test_float32_absorption(mode, norm_method, x0_norm, steps):
    """Positions x0, xm, x0 (|xm| = 0.5), output gradients h, h, −h (|h| = 1): the sample's gradient h xmᵀ has
    norm 0.5 < C (c = 1), but one GEMM over all B·T rows rounds h x0ᵀ at ulp(|x0|) ≫ 1."""
    gen = torch.Generator().manual_seed(0)
    x0, xm, h = _direction(gen, 4, x0_norm), _direction(gen, 4, 0.5), _direction(gen, 3, 1.0)
    assert torch.finfo(torch.float32).eps * x0_norm > 10 * C
    batches = _float32_batch(0, ([x0, xm, x0], [h, h, -h]), steps)
    _float32_influence(mode, lambda: nn.Linear(4, 3), batches, norm_method)


class _TiedPair(nn.Module):
    """Two Linear(4, 3) layers sharing one weight (float32), both on x: output [B, 2T, 3] = [fc_a(x); fc_b(x)]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc_a, self.fc_b = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
        self.fc_b.weight = self.fc_a.weight

    def forward(self, x):
        return torch.cat([self.fc_a(x), self.fc_b(x)], dim=1)


@pytest.mark.parametrize("steps", [2, 40])
@pytest.mark.parametrize("mode", MODES)
def test_float32_cancellation_across_layers_sharing_a_weight(mode, steps):
    """Positions x0 (|x0| = 1e8) and xm; fc_a's output gradients h, h and fc_b's −h, 0: the shared weight's gradient
    h x0ᵀ + h xmᵀ − h x0ᵀ = h xmᵀ is small, each layer's part and their cross term ≈ −‖h x0ᵀ‖² are not."""
    gen = torch.Generator().manual_seed(0)
    x0, xm, h = _direction(gen, 4, 1e8), _direction(gen, 4, 0.5), _direction(gen, 3, 1.0)
    x, g = torch.randn(3, steps, 4, generator=gen), torch.randn(3, 2 * steps, 3, generator=gen)
    x[-1], g[-1] = 0.0, 0.0
    x[-1, 0], x[-1, 1], g[-1, 0], g[-1, 1], g[-1, steps] = x0, xm, h, h, -h
    _float32_influence(mode, _TiedPair, without_last(x, g))


class _ParallelHeads(nn.Module):
    """Three Linear(4, 3) layers of one shape on the same x (float32), outputs side by side along the sequence:
    [B, 3T, 3]. In ``flash_fuse`` they are counted and assembled as one group
    (`flashnorm.grad_sample.layer_groups`)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleList(nn.Linear(4, 3) for _ in range(3))

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=1)


def _grouped_batch(rows, steps):
    """Three samples; the last one's positions and its first head's output gradients are ``rows``, its other heads'
    output gradients 0 (the other samples random)."""
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(3, steps, 4, generator=gen), torch.randn(3, 3 * steps, 3, generator=gen)
    x[-1], g[-1] = 0.0, 0.0
    x[-1, :len(rows[0])], g[-1, :len(rows[1])] = torch.stack(rows[0]), torch.stack(rows[1])
    return without_last(x, g)


@pytest.mark.parametrize("steps", [3, 37])
@pytest.mark.parametrize("norm_method", ["flash", "gram"])
@pytest.mark.parametrize("scenario", ["absorption", "gram_cancellation"])
def test_float32_rounding_attacks_on_grouped_layers(monkeypatch, scenario, norm_method, steps):
    """The float32 absorption and Gram-cancellation inputs above, fed to one layer of a group of three same-shaped
    Linears: the grouped norm launch, rounding scale and batched assembly GEMM keep the sample's influence ≤ C
    (1 + 10⁻³), or the step refuses with θ unchanged."""
    from flashnorm.norms.linear import LinearFamilyRule

    grouped = []
    clipped = LinearFamilyRule.clipped_grads_grouped
    monkeypatch.setattr(LinearFamilyRule, "clipped_grads_grouped",
                        lambda self, layers, *a, **k: grouped.append(len(layers)) or clipped(self, layers, *a, **k))
    gen = torch.Generator().manual_seed(0)
    if scenario == "absorption":
        x0, xm, h = _direction(gen, 4, 1e8), _direction(gen, 4, 0.5), _direction(gen, 3, 1.0)
        rows = ([x0, xm, x0], [h, h, -h])
    else:
        x0, d, h = _direction(gen, 4, 1e6), _direction(gen, 4, 10.0), _direction(gen, 3, 3.0)
        rows = ([x0, x0 + d], [h, -h])
    _float32_influence("flash_fuse", _ParallelHeads, _grouped_batch(rows, steps), norm_method)
    assert grouped and set(grouped) == {3}, "the three heads were assembled as one group"


def test_an_adversarial_sample_in_grouped_layers_is_clipped_exactly():
    """float64: a sample 10× / 1e3× outside the bound, fed to a group of three same-shaped Linears: the step applies
    the float64 oracle's clipped sum exactly, and the sample's influence is ≤ C."""
    def build():
        return _ParallelHeads().double()

    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(4, 7, 4, generator=gen, dtype=torch.float64), torch.randn(4, 21, 3, generator=gen,
                                                                               dtype=torch.float64)
    x[-1] *= 10
    g[-1] *= 1e3

    def make(b):
        return step_on(make_private(build(), "flash_fuse", clip=C, norm_method="flash"), *b, exact_at=C)

    assert influence(make, without_last(x, g)) <= C * (1 + 1e-3)
