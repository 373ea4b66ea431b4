"""The normalisation rules (flashnorm/norms/normalization.py): LayerNorm and RMSNorm over the last dim (the
affine-norm kernel's path) and over two dims (the general sums), GroupNorm over channels and positions, with
and without bias, a frozen weight, against the float64 truth."""

import pytest
import torch
import torch.nn as nn

from flashnorm.norms import get_norm_rule
from tests.norms.truth import assert_rule_exact

C = 9
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def _random_affine(layer: nn.Module) -> nn.Module:
    """Weights and biases drawn at random (not the 1 and 0 they start at), so that every term shows."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


#: name → (layer, input shape after the batch for a length T).
LAYERS = {
    "layernorm": (lambda: nn.LayerNorm(C), lambda t: (t, C)),
    "layernorm_4d": (lambda: nn.LayerNorm(C), lambda t: (2, t, C)),
    "layernorm_nobias": (lambda: nn.LayerNorm(C, bias=False), lambda t: (t, C)),
    "layernorm_2dims": (lambda: nn.LayerNorm((3, C)), lambda t: (t, 3, C)),
    "rmsnorm": (lambda: nn.RMSNorm(C), lambda t: (t, C)),
    "rmsnorm_eps_none": (lambda: nn.RMSNorm(C, eps=None), lambda t: (t, C)),
    "rmsnorm_2dims": (lambda: nn.RMSNorm((3, C)), lambda t: (t, 3, C)),
    "groupnorm_1d": (lambda: nn.GroupNorm(3, C), lambda t: (C, t)),
    "groupnorm_2d": (lambda: nn.GroupNorm(3, C), lambda t: (C, t, 3)),
}


def layer_and_pair(name, batch, steps, dtype, device):
    make, shape = LAYERS[name]
    layer = _random_affine(make()).to(device, dtype)
    x = torch.randn(batch, *shape(steps), dtype=dtype, device=device)
    return layer, x, torch.randn_like(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", (1, 37, 601))
@pytest.mark.parametrize("name", LAYERS)
def test_rule_matches_float64(name, steps, dtype, device):
    layer, x, g = layer_and_pair(name, 3, steps, DTYPES[dtype], device)
    assert_rule_exact(get_norm_rule(layer), layer, x, g)


@pytest.mark.parametrize("name", ("layernorm", "groupnorm_1d"))
def test_batch_without_positions(name, device):
    """[B, C] inputs: one position per sample (GroupNorm sums over no spatial dim)."""
    make, _ = LAYERS[name]
    layer = _random_affine(make()).to(device, torch.float64)
    x = torch.randn(3, C, dtype=torch.float64, device=device)
    assert_rule_exact(get_norm_rule(layer), layer, x, torch.randn_like(x))


@pytest.mark.parametrize("frozen", ("weight", "bias"))
@pytest.mark.parametrize("name", ("layernorm", "groupnorm_1d"))
def test_frozen_parameter(name, frozen, device):
    """A frozen weight takes the general sums (the kernel needs the weight); a frozen bias, the weight alone."""
    layer, x, g = layer_and_pair(name, 3, 37, torch.float64, device)
    getattr(layer, frozen).requires_grad_(False)
    assert_rule_exact(get_norm_rule(layer), layer, x, g)


@pytest.mark.parametrize("name", ("layernorm", "rmsnorm_2dims", "groupnorm_1d"))
def test_empty_batch(name, device):
    layer, x, g = layer_and_pair(name, 0, 37, torch.float32, device)
    assert_rule_exact(get_norm_rule(layer), layer, x, g)
