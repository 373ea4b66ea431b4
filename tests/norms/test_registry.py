"""The rule registry (flashnorm/norms/registry.py): every family registered on import, lookup along the MRO
(a subclass keeping its parent's forward inherits the rule, one overriding it gets none), no silent overwrite,
and a user's rule for a layer of their own, exact on tensors and used by the library in a real step."""

from typing import Dict, List, Optional

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from flashnorm.norms import NormRule, get_norm_rule, register_norm_rule
from flashnorm.norms.conv import ConvRule
from flashnorm.norms.embedding import EmbeddingRule
from flashnorm.norms.linear import GPT2Conv1DRule, LinearRule
from flashnorm.norms.normalization import GroupNormRule, LayerNormRule, RMSNormRule
from flashnorm.norms.registry import iter_rules
from tests.norms.truth import assert_rule_exact, assert_step_exact
from tests.zoo import MeanOver


class Gain(nn.Module):
    """y = x ⊙ w, w: [d], on inputs [B, ..., d]: a layer no family covers."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.weight


@register_norm_rule(Gain)
class GainRule(NormRule):
    """∇w_b = Σ_t G_b[t] ⊙ X_b[t] (over every position of sample b); ``calls`` counts the library's calls."""

    methods = ("exact",)
    calls: List[str] = []

    def _grads(self, layer, x, g):
        return (g * x).flatten(1, -2).sum(dim=1)  # [B, d]

    def norm_sq(self, layer, x, g, method, vectors=True, *, backend=None):  # no kernel: backend unused
        self.calls.append(f"norm_sq:{method}")
        if method == "per_sample":
            return super().norm_sq(layer, x, g, method)
        return self._grads(layer, x, g).square().sum(dim=1)

    def per_sample_grads(self, layer, x, g, out: Optional[Dict] = None, *, backend=None):
        return {layer.weight: self._grads(layer, x, g)}

    def clipped_grads(self, layer, x, g, coef, vectors=True, *, backend=None):
        self.calls.append("clipped_grads")
        return {layer.weight: (coef.to(x.dtype).unsqueeze(1) * self._grads(layer, x, g)).sum(dim=0)}


def test_every_family_is_registered():
    families = {
        nn.Linear: LinearRule, Conv1D: GPT2Conv1DRule, nn.Embedding: EmbeddingRule, nn.Conv1d: ConvRule,
        nn.Conv2d: ConvRule, nn.LayerNorm: LayerNormRule, nn.RMSNorm: RMSNormRule, nn.GroupNorm: GroupNormRule,
    }  # fmt: skip
    registered = dict(iter_rules())
    for layer_type, rule_type in families.items():
        assert type(registered[layer_type]) is rule_type, layer_type.__name__
    assert get_norm_rule(nn.Conv3d(1, 1, 1)) is None and get_norm_rule(nn.Tanh()) is None


class MyLinear(nn.Linear):
    pass


class MyMyLinear(MyLinear):
    pass


class ForwardOverride(nn.Linear):
    def forward(self, x):
        return super().forward(x).relu()


class BelowAnOverride(ForwardOverride):
    pass


def test_lookup_follows_the_mro():
    """Subclasses that keep Linear's forward share its rule; an override anywhere below Linear drops it."""
    linear_rule = get_norm_rule(nn.Linear(2, 3))
    assert get_norm_rule(MyLinear(2, 3)) is linear_rule
    assert get_norm_rule(MyMyLinear(2, 3)) is linear_rule
    assert get_norm_rule(ForwardOverride(2, 3)) is None
    assert get_norm_rule(BelowAnOverride(2, 3)) is None


def test_inherited_rule_is_exact_on_the_subclass(device):
    layer = MyLinear(7, 5).to(device, torch.float64)
    x = torch.randn(3, 37, 7, dtype=torch.float64, device=device)
    assert_rule_exact(get_norm_rule(layer), layer, x, torch.randn(3, 37, 5, dtype=torch.float64, device=device),
                      methods=("flash", "gram"))  # fmt: skip


def test_registering_twice_needs_force():
    class Twice(nn.Module):  # a fresh type per run: the registry is process-wide
        pass

    @register_norm_rule(Twice)
    class First(NormRule):
        def per_sample_grads(self, layer, x, g, out=None, *, backend=None):
            return {}

    with pytest.raises(ValueError, match="already registered; pass force=True"):

        @register_norm_rule(Twice)
        class Second(First):
            pass

    assert type(get_norm_rule(Twice())) is First

    @register_norm_rule(Twice, force=True)
    class Third(First):
        pass

    assert type(get_norm_rule(Twice())) is Third
    with pytest.raises(ValueError, match="already registered"):
        register_norm_rule(nn.Linear)(LinearRule)
    assert type(get_norm_rule(nn.Linear(2, 3))) is LinearRule


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=["fp64", "fp32"])
@pytest.mark.parametrize("steps", (1, 37, 601))
def test_user_rule_matches_float64(steps, dtype, device):
    layer = Gain(7).to(device, dtype)
    x = torch.randn(3, steps, 7, dtype=dtype, device=device)
    rule = get_norm_rule(layer)
    assert type(rule) is GainRule
    assert_rule_exact(rule, layer, x, torch.randn_like(x), methods=("exact", "per_sample"))


@pytest.mark.parametrize("mode", ["ghost", "flash", "flash_fuse"])
def test_user_rule_in_a_step(mode):
    """The library hooks the user's layer with the user's rule (its norm by its one method; the one-pass mode
    its clipped sum too), and the step is exact against the float64 oracle."""
    model = nn.Sequential(nn.Linear(6, 7), Gain(7), nn.Tanh(), MeanOver(1), nn.Linear(7, 3)).double()
    x, y = torch.randn(3, 37, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    GainRule.calls.clear()
    assert_step_exact(model, x, y, mode)
    assert GainRule.calls == ["norm_sq:exact"] + (["clipped_grads"] if mode == "flash_fuse" else [])
