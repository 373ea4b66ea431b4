"""A layer subclass keeps its parent's norm rule only while every method on the rule's call path is the parent's.

Attacker's view: a subclass that keeps ``forward`` but changes what it computes in a helper (weight standardisation
in ``Conv2d._conv_forward``) must not be measured with the parent's algebra; it takes the exact per-sample fallback
and every mode applies the float64 oracle's clipped sum. Overrides off the call path keep the fast rule.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flashnorm.norms import get_norm_rule
from flashnorm.norms.conv import ConvRule
from flashnorm.norms.linear import LinearRule
from tests.grad_sample.guarantee import MODES, Attempt, influence, make_private, oracle, step, without_last

C = 1.0


class WSConv2d(nn.Conv2d):
    """Weight standardisation: the convolution of (W - mean W) / std W, written in the helper ``forward`` calls."""

    def _conv_forward(self, input, weight, bias):
        flat = weight.flatten(1)
        standard = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).view_as(weight)
        return super()._conv_forward(input, standard, bias)


class ScaledConv1d(nn.Conv1d):
    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, 3.0 * weight, bias)


class RenamedConv2d(nn.Conv2d):
    """Overrides only methods off the call path."""

    def _get_name(self):
        return "Renamed"

    def extra_repr(self):
        return "renamed"


class RenamedLinear(nn.Linear):
    def _get_name(self):
        return "Renamed"


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


class CalledLinear(nn.Linear):
    """Overrides the call machinery itself."""

    def __call__(self, x):
        return super().__call__(2.0 * x)


def test_a_subclass_overriding_a_helper_on_the_call_path_gets_no_rule():
    assert get_norm_rule(WSConv2d(2, 3, 3)) is None
    assert get_norm_rule(ScaledConv1d(2, 3, 3)) is None
    assert get_norm_rule(DoubledLinear(2, 3)) is None
    assert get_norm_rule(CalledLinear(2, 3)) is None


def test_overrides_off_the_call_path_keep_the_rule():
    assert isinstance(get_norm_rule(RenamedConv2d(2, 3, 3)), ConvRule)
    assert isinstance(get_norm_rule(RenamedLinear(2, 3)), LinearRule)
    assert isinstance(get_norm_rule(nn.Conv2d(2, 3, 3)), ConvRule)
    assert isinstance(get_norm_rule(nn.LazyConv2d(3, 3)), ConvRule)


def _conv_model(conv_cls):
    torch.manual_seed(0)
    return nn.Sequential(conv_cls(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()


def _conv_batch(n=4):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x[-1] *= 10
    g[-1] *= 1e3
    return without_last(x, g)


@pytest.mark.parametrize("conv_cls", (WSConv2d, RenamedConv2d))
@pytest.mark.parametrize("mode", MODES)
def test_a_conv_subclass_is_exact_in_every_mode(mode, conv_cls):
    """Weight standardisation in ``_conv_forward`` (the fallback) and a renamed Conv2d (the rule): the adversarial
    sample's influence is ≤ C and both steps apply the oracle's clipped sum."""
    def make(b):
        x, g = b
        model = _conv_model(conv_cls)
        private = make_private(model, mode, clip=C)
        return Attempt(model, lambda: step(private, x, g), expected=oracle(private.model, x, g, C))

    assert influence(make, _conv_batch(), C) <= C * (1 + 1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_a_linear_subclass_overriding_forward_is_exact(mode):
    def make(b):
        x, g = b
        torch.manual_seed(0)
        model = nn.Sequential(DoubledLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        private = make_private(model, mode, clip=C)
        return Attempt(model, lambda: step(private, x, g), expected=oracle(private.model, x, g, C))

    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(4, 6, 4, generator=gen, dtype=torch.float64), torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    x[-1] *= 10
    g[-1] *= 1e3
    assert influence(make, without_last(x, g), C) <= C * (1 + 1e-3)
