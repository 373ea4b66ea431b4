"""The Linear family's rule (flashnorm/norms/linear.py): ``nn.Linear`` on 2-D to 4-D inputs, with and without
bias, frozen weight or bias, and GPT-2's ``Conv1D`` (weight stored [d, p]), against the float64 truth."""

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from flashnorm.norms import get_norm_rule
from flashnorm.norms.linear import GPT2Conv1DRule, LinearRule
from tests.norms.truth import assert_rule_exact

D, P = 7, 5
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
LAYERS = {
    "linear": lambda: nn.Linear(D, P),
    "linear_nobias": lambda: nn.Linear(D, P, bias=False),
    "gpt2_conv1d": lambda: Conv1D(P, D),
}
#: Input shape [B, *middle, d] by rank, for a sequence length T.
SHAPES = {"2d": lambda t: (), "3d": lambda t: (t,), "4d": lambda t: (2, t)}
#: (rank, T): 2-D inputs have no sequence dimension.
RANK_STEPS = [("2d", 1)] + [(rank, t) for rank in ("3d", "4d") for t in (1, 37, 601)]


def layer_and_pair(name, rank, batch, steps, dtype, device):
    layer = LAYERS[name]().to(device, dtype)
    middle = SHAPES[rank](steps)
    x = torch.randn(batch, *middle, D, dtype=dtype, device=device)
    g = torch.randn(batch, *middle, P, dtype=dtype, device=device)
    return layer, x, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank,steps", RANK_STEPS)
@pytest.mark.parametrize("name", LAYERS)
def test_rule_matches_float64(name, rank, steps, dtype, device):
    layer, x, g = layer_and_pair(name, rank, 3, steps, DTYPES[dtype], device)
    assert_rule_exact(get_norm_rule(layer), layer, x, g, methods=("flash", "gram"))


@pytest.mark.parametrize("name", LAYERS)
def test_empty_batch(name, device):
    layer, x, g = layer_and_pair(name, "3d", 0, 37, torch.float32, device)
    assert_rule_exact(get_norm_rule(layer), layer, x, g, methods=("flash", "gram"))


@pytest.mark.parametrize("frozen", ("weight", "bias"))
@pytest.mark.parametrize("name", ("linear", "gpt2_conv1d"))
def test_frozen_parameter(name, frozen, device):
    """A frozen weight leaves the bias alone (then not a vector parameter); a frozen bias, the weight alone."""
    layer, x, g = layer_and_pair(name, "3d", 3, 37, torch.float64, device)
    getattr(layer, frozen).requires_grad_(False)
    rule = get_norm_rule(layer)
    assert rule.vector_params(layer) == []
    assert_rule_exact(rule, layer, x, g, methods=("flash", "gram"))


def test_rules_and_sizes():
    """Linear and Conv1D each get their rule; ``sizes`` is the flattened (B, T, d, p) the planner reads."""
    linear, conv = nn.Linear(D, P), Conv1D(P, D)
    assert type(get_norm_rule(linear)) is LinearRule and type(get_norm_rule(conv)) is GPT2Conv1DRule
    x, g = torch.randn(3, 2, 37, D), torch.randn(3, 2, 37, P)
    assert get_norm_rule(linear).sizes(linear, x, g) == (3, 74, D, P)
    assert get_norm_rule(conv).sizes(conv, x, g) == (3, 74, D, P)
    assert get_norm_rule(linear).vector_params(linear) == [linear.bias]


@pytest.mark.parametrize("name", LAYERS)
def test_norm_sq_by_every_listed_method(name, device):
    """The registry's contract: norm_sq accepts every method the rule lists in ``methods``."""
    layer, x, g = layer_and_pair(name, "3d", 3, 37, torch.float64, device)
    assert_rule_exact(get_norm_rule(layer), layer, x, g)
