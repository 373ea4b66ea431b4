"""The clipping coefficient's rounding allowance (flashnorm.norms.rounding): the scale each rule reports bounds the
float32 rounding of its per-sample gradient, and the allowance leaves ordinary inputs exactly Opacus's coefficient."""

import pytest
import torch
import torch.nn as nn

from flashnorm.kernels import flash_norm_sq
from flashnorm.norms import get_norm_rule, rounding

C = 1.0


def _opacus_coef(norm_sq: torch.Tensor) -> torch.Tensor:
    """Opacus's per-sample clip factor, as its optimizer computes it from the norms."""
    return (C / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)


def test_coefficient_is_opacus_where_the_bound_is_within_the_allowance():
    norm_sq = torch.tensor([4.0, 0.25, 100.0])
    opacus = _opacus_coef(norm_sq)
    torch.testing.assert_close(rounding.clipping_coef(norm_sq, None, C), opacus)
    within = norm_sq.sqrt() * (1 + 0.5 * rounding.ALLOWANCE)
    torch.testing.assert_close(rounding.clipping_coef(norm_sq, within, C), opacus)


def test_coefficient_follows_the_bound_beyond_the_allowance():
    norm_sq = torch.tensor([0.25, 0.25, -3.0])  # the last: a Gram estimate cancelled below 0
    bound = torch.tensor([0.5, 40.0, 40.0])
    coef = rounding.clipping_coef(norm_sq, bound, C)
    assert coef[0] == 1.0
    expected = (1 + rounding.ALLOWANCE) * C / 40.0
    torch.testing.assert_close(coef[1:], torch.full((2,), expected))
    assert (coef * bound <= (1 + rounding.ALLOWANCE) * C + 1e-7).all()


def test_upper_bound_is_nan_when_even_the_bound_is_negative():
    bound = rounding.upper_bound(torch.tensor([-5.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert torch.isnan(bound[0]) and bound[1] == 1.0


@pytest.mark.parametrize("steps", [3, 37, 600])
def test_linear_scale_bounds_the_float32_rounding_of_cancelling_positions(steps):
    """x0 (|x0| = 1e8), xm, then −x0 paired with h, h, −h...: W_b = h xmᵀ is small, its float32 products are not."""
    torch.manual_seed(steps)
    layer = nn.Linear(4, 3)
    x = torch.randn(2, steps, 4)
    g = torch.randn(2, steps, 3)
    x0, h = 1e8 * torch.randn(4), torch.randn(3)
    x[1, 0], x[1, 1], x[1, 2] = x0, 0.5 * torch.randn(4), x0
    g[1, 0], g[1, 1], g[1, 2] = h, h, -h
    s, terms = get_norm_rule(layer).rounding_scale(layer, x, g)
    assert terms == steps
    exact = torch.einsum("btp,btd->bpd", g.double(), x.double()).flatten(1).norm(dim=1)
    computed = flash_norm_sq(x, g, backend="torch").double().sqrt()
    radius = rounding.gamma(terms, 2, x.dtype) * s.double()
    assert ((computed - exact).abs() <= radius).all(), (computed, exact, radius)
    assert radius[1] > 10 * exact[1], "the cancelling sample's rounding dwarfs its gradient"


@pytest.mark.parametrize("layer", [nn.LayerNorm(8), nn.RMSNorm(8), nn.GroupNorm(2, 8)], ids=lambda m: type(m).__name__)
def test_normalisation_scale_bounds_the_float32_rounding_of_cancelling_positions(layer):
    """Sample 1: equal inputs at positions 0 and 2 with output gradients 1e8·h and −1e8·h: its per-sample sums
    cancel to the middle position's term, their float32 rounding does not."""
    torch.manual_seed(0)
    channels_first = isinstance(layer, nn.GroupNorm)  # [B, C, L] with positions last, else [B, T, C]
    x, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    h = 1e8 * torch.randn(8)
    x[1, 2], g[1, 0], g[1, 2] = x[1, 0], h, -h
    if channels_first:
        x, g = x.transpose(1, 2).contiguous(), g.transpose(1, 2).contiguous()
    rule = get_norm_rule(layer)
    s, terms = rule.rounding_scale(layer, x, g)
    exact = rule.per_sample_grads(layer.double(), x.double(), g.double())
    computed = rule.per_sample_grads(layer.float(), x, g)
    error = torch.stack([(computed[p].double() - exact[p]).flatten(1).norm(dim=1) for p in computed]).norm(dim=0)
    assert (error <= rounding.gamma(terms, 2, x.dtype) * s.double()).all(), (error, s)
    assert error[1] > 1.0, "the cancelling sample's float32 rounding is large"


@pytest.mark.parametrize("steps,shrink", [(37, 0.0), (600, 1e-3), (1030, 1e-3)])
def test_ordinary_inputs_keep_opacus_coefficient_or_shrink_it_by_less_than_the_allowance(steps, shrink):
    """Random inputs (the least aligned per-sample gradients, ‖W_b‖ ≈ s_b/√T): the coefficient is Opacus's at
    T = 37; at long sequences the allowance binds and shrinks it by less than τ."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    x, g = torch.randn(4, steps, 64), torch.randn(4, steps, 48)
    s, terms = get_norm_rule(layer).rounding_scale(layer, x, g)
    norm_sq = flash_norm_sq(x, g, backend="torch")
    bound = rounding.upper_bound(norm_sq, (2 * rounding.gamma(terms, 4, x.dtype) * s).square(), None)
    ratio = rounding.clipping_coef(norm_sq, bound, C) / _opacus_coef(norm_sq)
    assert (ratio <= 1).all() and (ratio >= 1 - shrink).all(), ratio
    if shrink == 0.0:
        assert (ratio == 1).all()


def test_gram_in_float64_beyond_32_positions():
    assert not rounding.gram_in_float64(rounding.GRAM_FLOAT32_MAX_STEPS, torch.float32)
    assert rounding.gram_in_float64(rounding.GRAM_FLOAT32_MAX_STEPS + 1, torch.bfloat16)
    assert not rounding.gram_in_float64(4096, torch.float64)
