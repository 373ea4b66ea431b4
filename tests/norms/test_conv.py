"""The convolution rule (flashnorm/norms/conv.py): Conv1d and Conv2d with stride, dilation, explicit, "same"
(even kernel: uneven padding) and "valid" padding, with and without bias, against the float64 truth."""

import pytest
import torch
import torch.nn as nn

from flashnorm.norms import get_norm_rule
from tests.norms.truth import assert_rule_exact, input_and_output_grad

C_IN, C_OUT, WIDTH = 3, 7, 5
# PyTorch's note that an even "same" kernel pads a copy of the input (the case is here on purpose).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
#: name → (layer, input shape after the batch for a length T); every layer accepts T = 1.
LAYERS = {
    "conv1d": (lambda: nn.Conv1d(C_IN, C_OUT, 3, padding=1), lambda t: (C_IN, t)),
    "conv1d_stride_dilation": (lambda: nn.Conv1d(C_IN, C_OUT, 3, stride=2, dilation=2, padding=2), lambda t: (C_IN, t)),
    "conv1d_same_even": (lambda: nn.Conv1d(C_IN, C_OUT, 4, padding="same", dilation=2), lambda t: (C_IN, t)),
    "conv1d_valid_nobias": (lambda: nn.Conv1d(C_IN, C_OUT, 1, padding="valid", bias=False), lambda t: (C_IN, t)),
    "conv2d": (
        lambda: nn.Conv2d(C_IN, C_OUT, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        lambda t: (C_IN, t, WIDTH),
    ),
    "conv2d_same_even_nobias": (
        lambda: nn.Conv2d(C_IN, C_OUT, 2, padding="same", bias=False), lambda t: (C_IN, t, WIDTH)
    ),
}


def layer_and_pair(name, batch, steps, dtype, device):
    make, shape = LAYERS[name]
    layer = make().to(device, dtype)
    return (layer, *input_and_output_grad(layer, (batch, *shape(steps)), dtype, device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", (1, 37, 601))
@pytest.mark.parametrize("name", LAYERS)
def test_rule_matches_float64(name, steps, dtype, device):
    layer, x, g = layer_and_pair(name, 3, steps, DTYPES[dtype], device)
    assert_rule_exact(get_norm_rule(layer), layer, x, g, methods=("flash", "gram"))


@pytest.mark.parametrize("name", ("conv1d", "conv2d"))
def test_empty_batch(name, device):
    layer, x, g = layer_and_pair(name, 0, 37, torch.float32, device)
    assert_rule_exact(get_norm_rule(layer), layer, x, g, methods=("flash", "gram"))


def test_sizes_are_the_unfolded_problem():
    """(B, L, C_in·Πk, C_out): L output positions, each a Linear row of the unfolded patch."""
    make, shape = LAYERS["conv2d"]
    layer = make()
    x = torch.randn(3, *shape(37))
    g = torch.randn(layer(x).shape)
    assert get_norm_rule(layer).sizes(layer, x, g) == (3, 19 * 3, C_IN * 3 * 2, C_OUT)


@pytest.mark.parametrize("name", LAYERS)
def test_sizes_from_shapes_equal_the_unfolded_sequences(name):
    """``sizes`` reads the shapes (the planner and the rounding allowance call it every step) without unfolding."""
    layer, x, g = layer_and_pair(name, 2, 37, torch.float32, "cpu")
    rule = get_norm_rule(layer)
    xs, gs = rule.as_sequences(layer, x, g)
    assert rule.sizes(layer, x, g) == (*xs.shape, gs.shape[-1])


@pytest.mark.parametrize(
    "layer,reason",
    [
        (nn.Conv1d(4, 6, 3, groups=2), "grouped convolution (groups != 1)"),
        (nn.Conv2d(C_IN, C_OUT, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    ],
    ids=["groups", "reflect"],
)
def test_unsupported_layouts_fall_back(layer, reason):
    assert get_norm_rule(layer).supports(layer) == reason
