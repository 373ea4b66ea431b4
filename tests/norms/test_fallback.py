"""The per-sample fallback (flashnorm/norms/fallback.py) for layers without a rule: through Opacus's grad sampler
where one is registered for the exact type, else functorch over the whole layer (children included); and a
subclass that overrides ``forward``, which must get the fallback rather than its parent's rule."""

import pytest
import torch
import torch.nn as nn

from flashnorm.norms import PerSampleGradFallback, get_norm_rule
from tests.norms.truth import (
    assert_rule_exact,
    assert_step_exact,
    input_and_output_grad,
    per_sample_truth,
)
from tests.zoo import MeanOver, Scale

D, P = 7, 5
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


class DoubledLinear(nn.Linear):
    """y = 2(xWᵀ + b): a Linear subclass whose forward is its own, so the Linear algebra no longer holds."""

    def forward(self, x):
        return 2 * super().forward(x)


#: name → (layer, input shape after the batch for a length T, covers_children).
LAYERS = {
    "functorch_with_child": (lambda: Scale(D), lambda t: (t, D), True),
    "doubled_linear": (lambda: DoubledLinear(D, P), lambda t: (t, D), True),
    "opacus_conv3d": (lambda: nn.Conv3d(3, P, 2, padding=1), lambda t: (3, t, 2, 2), False),
    "opacus_grouped_conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2), lambda t: (4, t), False),
}


def layer_and_pair(name, batch, steps, dtype, device):
    make, shape, _ = LAYERS[name]
    layer = make().to(device, dtype)
    return (layer, *input_and_output_grad(layer, (batch, *shape(steps)), dtype, device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", (1, 37))
@pytest.mark.parametrize("name", LAYERS)
def test_fallback_matches_float64(name, steps, dtype, device):
    layer, x, g = layer_and_pair(name, 3, steps, DTYPES[dtype], device)
    rule = PerSampleGradFallback(layer)
    assert rule.covers_children is LAYERS[name][2]
    assert rule.methods == ("per_sample",)
    assert_rule_exact(rule, layer, x, g)


def test_forward_override_gets_the_fallback_not_the_linear_rule(device):
    """The Linear rule would compute ‖G_bᵀX_b‖², a quarter of the doubled layer's true norm."""
    layer, x, g = layer_and_pair("doubled_linear", 3, 37, torch.float64, device)
    assert get_norm_rule(layer) is None
    truth = sum(gs.flatten(1).square().sum(dim=1) for gs in per_sample_truth(layer, x, g).values())
    linear_algebra = get_norm_rule(nn.Linear(D, P)).norm_sq(layer, x, g, method="flash")
    torch.testing.assert_close(linear_algebra * 4, truth)


@pytest.mark.parametrize("mode", ["flash", "flash_fuse"])
def test_forward_override_in_a_step(mode):
    """A model holding the subclass: the library falls back for it, and the step is exact."""
    model = nn.Sequential(DoubledLinear(D, P), nn.Tanh(), MeanOver(1), nn.Linear(P, 3)).double()
    x, y = torch.randn(3, 37, D, dtype=torch.float64), torch.randint(0, 3, (3,))
    assert_step_exact(model, x, y, mode)
