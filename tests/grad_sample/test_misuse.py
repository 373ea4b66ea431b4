"""Issue 18's table, row by row, in every mode: a misused step keeps the adversarial sample's influence ≤ C, or
raises a clear error with every parameter bit-identical (:mod:`tests.grad_sample.misuse`).

The adversarial sample's output gradients are chosen: ℓ_b = ⟨out_b, G_b⟩ (:class:`LinearLoss`). float64 rows
also require the step to apply the float64 oracle's Σ_b c_b ∇ℓ_b exactly; float32 rows (Gram cancellation,
absorption) require the bound only. A row the library does not satisfy yet is a strict xfail naming what is
missing, so that it flips when fixed. The property test at the end draws zoo models × misuses × modes.
"""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.schedulers import ExponentialGradClip
from opacus.utils.batch_memory_manager import BatchMemoryManager

from tests.grad_sample.misuse import (
    MODES, Attempt, LinearLoss, assert_unchanged, bounded_or_refused, make_private, oracle, run, snapshot,
)
from tests.oracle import microbatch_reference
from tests.zoo import KINDS, build

C = 1.0
NO_CAPTURE = "No captured forward pass"
NOT_CLIPPED = "not produced by the clipping workflow"


def _probe(dtype=torch.float64):
    """[B, T, 4] → Linear → tanh → Linear → [B, T, 3]."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _batch(n, seed, t=6):
    """(X [n, t, 4], G [n, t, 3]) float64, standard normal."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 4, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, t, 3, generator=gen, dtype=torch.float64)


def _adversarial(n=4):
    """(batch with the adversarial sample last, the batch without it): its input is 10× and its output gradients
    1e3× larger."""
    x, g = _batch(n, seed=1)
    x[-1] *= 10
    g[-1] *= 1e3
    return (x, g), (x[:-1], g[:-1])


def _step(private, x, g):
    private.criterion(private.model(x), g).backward()
    private.optimizer.step()


def test_the_adversarial_sample_is_far_outside_the_bound():
    """The rows below would notice an unclipped step: the adversarial sample's gradient norm is ≫ C."""
    (x, g), _ = _adversarial()
    norms = microbatch_reference(_probe(), x, g, lambda out, t: (out * t).sum(), C).norms
    assert norms[-1] > 1e3 * C and norms[:-1].max() < norms[-1] / 100


def _influence(make, batch, clip=C, refusal=r"$^"):
    """bounded_or_refused for (batch with the adversarial sample last, batch without it)."""
    return bounded_or_refused(make, *batch, clip, refusal)


def _sized(batch_size):
    """_adversarial() with ``batch_size`` samples (B = 1: the batch without it is empty, as Poisson sampling's)."""
    (x, g), _ = _adversarial(4)
    x, g = x[4 - batch_size:], g[4 - batch_size:]
    return (x, g), (x[:-1], g[:-1])


# -- a training forward in eval mode or with hooks disabled ----------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["eval", "hooks_disabled"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_an_uncaptured_forward_of_the_previous_batch_size_is_refused(mode, how, batch_size):
    """A step in eval mode (``model.train()`` forgotten) or with hooks disabled, with the B of the step before."""
    def make(batch):
        x, g = batch
        model = _probe()
        private = make_private(model, mode, clip=C)
        _step(private, *_batch(batch_size, seed=2))
        private.optimizer.zero_grad()
        private.model.eval() if how == "eval" else private.model.disable_hooks()
        return Attempt(model, lambda: _step(private, x, g))

    assert _influence(make, _sized(batch_size), refusal=NO_CAPTURE) is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["eval", "hooks_disabled"])
def test_an_uncaptured_forward_after_an_unused_training_forward_is_refused_or_exact(mode, how):
    """A training forward whose loss is dropped, then the step's forward in eval mode (or with hooks disabled):
    measured ghost/flash influence 1.5e4 (unclipped), flash_fuse applies zeros."""
    def make(batch):
        x, g = batch
        model = _probe()
        private = make_private(model, mode, clip=C)
        private.model(_batch(len(x), seed=2)[0])
        private.model.eval() if how == "eval" else private.model.disable_hooks()
        return Attempt(model, lambda: _step(private, x, g), expected=oracle(private.model, x, g, C))

    _influence(make, _adversarial(), refusal=NO_CAPTURE)


# -- a loss not built with the returned criterion ------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["plain", "plain_mean", "plain_after_dp_backward"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_plain_backward_is_refused_by_the_optimizer(mode, how, batch_size):
    """``(out * G).sum().backward()`` (``nn.CrossEntropyLoss()(out, y)``, HF's ``outputs.loss``) then ``step()``;
    also after a DP backward of the same step (the plain gradient adds to the clipped one)."""
    def make(batch):
        x, g = batch
        model = _probe()
        private = make_private(model, mode, clip=C)

        def act():
            if how == "plain_after_dp_backward":
                private.criterion(private.model(x), g).backward()
            loss = LinearLoss("mean" if how == "plain_mean" else "sum")(private.model(x), g)
            loss.backward()
            private.optimizer.step()
        return Attempt(model, act)

    assert _influence(make, _sized(batch_size), refusal=NOT_CLIPPED) is None


# -- requires_grad changed after make_private ----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["unfreeze", "freeze", "unfreeze_between_micro_batches"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_layer_frozen_or_unfrozen_after_make_private_is_clipped(mode, how, batch_size):
    """Progressive unfreezing (the optimizer holds every parameter): the first layer, frozen at make_private, is
    unfrozen after a step (or a trainable one frozen; or unfrozen between two micro-batches of one step)."""
    layer = 2 if how == "freeze" else 0  # the layer whose requires_grad changes

    def make(batch):
        x, g = batch
        model = _probe()
        model[layer].requires_grad_(how == "freeze")
        private = make_private(model, mode, clip=C)
        warm_x, warm_g = _batch(batch_size, seed=2)
        if how == "unfreeze_between_micro_batches":
            expected = oracle(private.model, warm_x, warm_g, C)
            private.criterion(private.model(warm_x), warm_g).backward()
            model[layer].requires_grad_(True)
            expected = expected + oracle(private.model, x, g, C)
            return Attempt(model, lambda: _step(private, x, g), expected=expected)
        _step(private, warm_x, warm_g)
        private.optimizer.zero_grad()
        model[layer].requires_grad_(how != "freeze")
        return Attempt(model, lambda: _step(private, x, g), expected=oracle(private.model, x, g, C))

    if how == "unfreeze_between_micro_batches":  # the influence of the sample of the second micro-batch
        _influence(make, _sized(batch_size), refusal="requires_grad")
    else:
        assert _influence(make, _sized(batch_size)) is not None


@pytest.mark.parametrize("mode", MODES)
def test_a_step_without_backward_after_unfreezing_adds_noise_only(mode):
    """Opacus's step of noise alone (no backward) after progressive unfreezing: with noise 0 nothing moves (or
    the step refuses, naming requires_grad)."""
    model = _probe()
    model[0].requires_grad_(False)
    private = make_private(model, mode, clip=C)
    _step(private, *_batch(4, seed=2))
    private.optimizer.zero_grad()
    model[0].requires_grad_(True)
    applied = run(Attempt(model, private.optimizer.step), refusal="requires_grad")
    assert applied is None or not applied.any()


@pytest.mark.parametrize("mode", MODES)
def test_requires_grad_changed_between_forward_and_backward_is_refused(mode):
    (x, g), _ = _adversarial()
    model = _probe()
    model[0].requires_grad_(False)
    private = make_private(model, mode, clip=C)
    out = private.model(x)
    model[0].requires_grad_(True)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="requires_grad changed between the forward pass and the backward pass"):
        private.criterion(out, g).backward()
        private.optimizer.step()
    assert_unchanged(model, before)


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
    """Checked on every step (parameter aliases; before: on the first step only, influence 2.0 in ghost/flash and the
    gradient dropped in flash_fuse)."""
    def make(batch):
        x, g = batch
        model = _Leaky()
        private = make_private(model, mode, clip=C)
        _step(private, *_batch(4, seed=2))
        private.optimizer.zero_grad()
        model.leak = leak
        return Attempt(model, lambda: _step(private, x, g), expected=oracle(private.model, x, g, C))

    _influence(make, _adversarial(), refusal="outside that layer")


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["keyword_argument", "attribute_changed"])
def test_the_fallback_differentiates_the_function_that_ran(mode, how):
    """A layer without a norm rule called with a keyword argument, or whose attribute changed after make_private:
    its per-sample gradients are those of the call that ran (before 32dc7ae: influence 401 in ghost/flash)."""
    def make(batch):
        x, g = batch
        model = _Gated(keyword=how == "keyword_argument").double()
        private = make_private(model, mode, clip=C)
        if how == "attribute_changed":
            model.gate.scale = 1e3
        return Attempt(model, lambda: _step(private, x, g), expected=oracle(private.model, x, g, C))

    x, g = _batch(4, seed=1)  # no input scaling needed: the fallback's own norm is 1e3x too small
    _influence(make, ((x, g), (x[:-1], g[:-1])), refusal="fallback|per-sample")


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
    return (x, g), (x[:-1], g[:-1])


def _direction(gen, n, norm):
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    return (v / v.norm() * norm).float()


def _float32_influence(mode, norm_method, batch):
    def make(b):
        x, g = b
        model = nn.Linear(4, 3)  # float32
        private = make_private(model, mode, clip=C, norm_method=norm_method)
        return Attempt(model, lambda: _step(private, x, g))

    return _influence(make, batch, refusal=FLOAT32_REFUSAL)


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
    batch = _float32_batch(seed, ([x0, x0 + d], [h, -h]), steps)
    _float32_influence(mode, None if mode == "ghost" else "gram", batch)


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
    _float32_influence(mode, norm_method, _float32_batch(0, ([x0, xm, x0], [h, h, -h]), steps))


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

    def make(b):
        xb, gb = b
        model = _TiedPair()
        private = make_private(model, mode, clip=C)
        return Attempt(model, lambda: _step(private, xb, gb))

    _influence(make, ((x, g), (x[:-1], g[:-1])), refusal=FLOAT32_REFUSAL)


# -- invalid max_grad_norm / noise_multiplier ----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,value", [("noise_multiplier", -1.0), ("noise_multiplier", float("nan")),
                                        ("noise_multiplier", float("inf")), ("max_grad_norm", float("nan")),
                                        ("max_grad_norm", float("inf")), ("max_grad_norm", 0.0)])
def test_invalid_privacy_parameters_set_on_the_optimizer_are_refused(mode, name, value):
    (x, g), _ = _adversarial()
    model = _probe()
    private = make_private(model, mode, clip=C, sigma=1.0)
    setattr(private.optimizer, name, value)
    before = snapshot(model)
    with pytest.raises((RuntimeError, ValueError), match=name):
        _step(private, x, g)
    assert_unchanged(model, before)


@pytest.mark.parametrize("mode", MODES)
def test_a_grad_clip_scheduler_changes_the_bound_that_is_applied(mode):
    def make(batch):
        x, g = batch
        model = _probe()
        private = make_private(model, mode, clip=C)
        ExponentialGradClip(private.optimizer, gamma=0.1).step()
        assert private.optimizer.max_grad_norm == pytest.approx(0.1 * C)
        return Attempt(model, lambda: _step(private, x, g), expected=oracle(private.model, x, g, 0.1 * C))

    _influence(make, _adversarial(), clip=0.1 * C, refusal="max_grad_norm")


# -- gradient accumulation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("sizes", [(4, 4), (4, 1), (1, 4), (4, 4, 4)])  # the adversarial sample in the last one
def test_k_backward_calls_before_one_step(mode, reduction, sizes):
    """Micro-batches of these sizes, one ``backward()`` each, then one ``step()`` (B = 1 takes the plain path)."""
    def make(batch):
        x, g = batch
        model = _probe()
        private = make_private(model, mode, clip=C, reduction=reduction)
        expected = oracle(private.model, x, g, C)
        for i, size in enumerate(sizes[:-1]):
            wx, wg = _batch(size, seed=10 + i)
            expected = expected + oracle(private.model, wx, wg, C)
            private.criterion(private.model(wx), wg).backward()
        scale = len(sizes) * 4 if reduction == "mean" else 1.0  # mean: the step divides by k × E
        return Attempt(model, lambda: _step(private, x, g), scale=scale, expected=expected)

    _influence(make, _sized(sizes[-1]), refusal=r"$^")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("skipped", [True, False])  # the adversarial sample in the skipped micro-batch or not
def test_signal_skip_step_accumulation(mode, reduction, skipped):
    """Two micro-batches, the first after ``signal_skip_step(True)`` (what ``BatchMemoryManager`` does), then one
    update of both clipped sums divided by the expected batch size of the logical batch (``mean``)."""
    def make(batch):
        model = _probe()
        private = make_private(model, mode, clip=C, reduction=reduction)
        other = _batch(4, seed=3)
        first, second = (batch, other) if skipped else (other, batch)
        expected = oracle(private.model, *first, C) + oracle(private.model, *second, C)
        private.optimizer.signal_skip_step(True)
        _step(private, *first)  # skipped: accumulated
        private.optimizer.zero_grad()
        scale = 4 if reduction == "mean" else 1.0  # the expected batch size (the logical batch's), as Opacus
        return Attempt(model, lambda: _step(private, *second), scale=scale, expected=expected)

    assert _influence(make, _adversarial()) is not None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_batch_memory_manager(mode, reduction):
    """One logical batch of 4 in physical batches of 2 and 2 (the adversarial sample in the last); one
    accountant step at the loader's sample rate."""
    def make(batch):
        x, g = batch
        model = _probe()
        private = make_private(model, mode, clip=C, data=(x, g), batch_size=len(x), reduction=reduction)

        def act():
            with BatchMemoryManager(data_loader=private.loader, max_physical_batch_size=3,
                                    optimizer=private.optimizer) as loader:
                for bx, bg in loader:
                    _step(private, bx, bg)
                    private.optimizer.zero_grad()
            assert private.engine.accountant.history == [(0.0, 1.0, 1)]
        return Attempt(model, act, scale=len(x) if reduction == "mean" else 1.0,
                       expected=oracle(private.model, x, g, C))

    assert _influence(make, _adversarial()) is not None


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_in_place_ops_on_hooked_outputs(mode, batch_size):
    def make(batch):
        x, g = batch
        model = _InPlace().double()
        private = make_private(model, mode, clip=C)
        return Attempt(model, lambda: _step(private, x, g), expected=oracle(private.model, x, g, C))

    assert _influence(make, _sized(batch_size)) is not None


# -- property test: zoo models × misuses × modes × reductions ------------------------------------------------
MISUSES = ("eval", "hooks_disabled", "plain_backward", "second_backward", "unfreeze", "freeze", "accumulation",
           "skip_step", "invalid_clip", "invalid_sigma", "outside_read")
ZOO_CLIP = 1e-3  # below every zoo sample's gradient norm: an unclipped sample shows


def _cross_entropy_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _zoo_case(kind, misuse, mode, reduction):
    """``make(batch)`` for a float64 zoo model of ``kind`` misused as ``misuse`` (the property test's scenario)."""
    def make(batch):
        x, y = batch
        torch.manual_seed(5)
        model, _, _ = build(kind, 4, batch=1)
        model = model.double()
        head = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))][-1]
        if misuse == "unfreeze":
            head.requires_grad_(False)
        clip = float("inf") if misuse == "invalid_clip" else ZOO_CLIP
        sigma = float("nan") if misuse == "invalid_sigma" else 0.0
        private = make_private(model, mode, clip=clip, sigma=sigma, reduction=reduction,
                               criterion=nn.CrossEntropyLoss(reduction=reduction))
        warm_x, warm_y = _zoo_warm(kind, 4)
        scale = 4.0 if reduction == "mean" else 1.0  # mean: the step divides by the expected batch size

        def expected():
            return oracle(private.model, x, y, ZOO_CLIP, loss=_cross_entropy_sum)

        if misuse in ("eval", "hooks_disabled", "unfreeze", "freeze", "outside_read"):
            _step(private, warm_x, warm_y)
            private.optimizer.zero_grad()
            if misuse == "outside_read":  # from now on the output also reads the head's first parameter directly
                weight = next(head.parameters())
                model.register_forward_hook(lambda module, inputs, out: out + weight.sum())
            elif misuse == "eval":
                private.model.eval()
            elif misuse == "hooks_disabled":
                private.model.disable_hooks()
            elif misuse == "unfreeze":
                head.requires_grad_(True)
            else:
                head.requires_grad_(False)
            return Attempt(model, lambda: _step(private, x, y), scale=scale, expected=expected())
        if misuse == "plain_backward":
            def act():
                nn.CrossEntropyLoss(reduction=reduction)(private.model(x), y).backward()
                private.optimizer.step()
            return Attempt(model, act)
        if misuse == "second_backward":
            def act():
                loss = private.criterion(private.model(x), y)
                loss.backward()
                private.optimizer.zero_grad()
                loss.backward()
                private.optimizer.step()
            return Attempt(model, act)
        if misuse == "accumulation":
            total = expected() + oracle(private.model, warm_x, warm_y, ZOO_CLIP, loss=_cross_entropy_sum)
            private.criterion(private.model(warm_x), warm_y).backward()
            scale = 2 * scale if reduction == "mean" else 1.0  # mean: divided by k × the expected batch size
            return Attempt(model, lambda: _step(private, x, y), scale=scale, expected=total)
        # skip_step
        total = expected() + oracle(private.model, warm_x, warm_y, ZOO_CLIP, loss=_cross_entropy_sum)
        private.optimizer.signal_skip_step(True)
        _step(private, warm_x, warm_y)
        private.optimizer.zero_grad()
        return Attempt(model, lambda: _step(private, x, y), scale=scale, expected=total)

    return make


def _zoo_warm(kind, n):
    torch.manual_seed(6)
    _, x, y = build(kind, 4, batch=n)
    return (x.double() if x.is_floating_point() else x), y


def _zoo_cases(count=80, seed=18):
    rng = random.Random(seed)
    return [(rng.choice(KINDS), rng.choice(MISUSES), rng.choice(MODES), rng.choice(("sum", "mean")))
            for _ in range(count)]


@pytest.mark.parametrize("kind", KINDS)
def test_zoo_samples_are_clipped(kind):
    """ZOO_CLIP binds on every sample: an unclipped one would show in the influence."""
    torch.manual_seed(7)
    model, x, y = build(kind, 4, batch=4)
    norms = microbatch_reference(model, x, y, _cross_entropy_sum, ZOO_CLIP).norms
    assert norms.min() > 10 * ZOO_CLIP


@pytest.mark.parametrize("kind,misuse,mode,reduction", _zoo_cases())
def test_zoo_misuse_is_bounded_or_refused(kind, misuse, mode, reduction):
    torch.manual_seed(7)
    _, x, y = build(kind, 4, batch=4)
    x = x.double() if x.is_floating_point() else x
    make = _zoo_case(kind, misuse, mode, reduction)
    refusal = {"eval": NO_CAPTURE, "hooks_disabled": NO_CAPTURE, "second_backward": NO_CAPTURE,
               "plain_backward": NOT_CLIPPED, "invalid_clip": "max_grad_norm", "outside_read": "outside that layer",
               "invalid_sigma": "noise_multiplier"}.get(misuse, r"$^")
    if misuse.startswith("invalid"):
        with pytest.raises(ValueError, match=refusal):
            make((x, y))
        return
    influence = _influence(make, ((x, y), (x[:-1], y[:-1])), clip=ZOO_CLIP, refusal=refusal)
    assert (influence is None) == (refusal != r"$^"), "refused a supported step, or stepped on a misused one"
