"""bf16 autocast: every clipping mode within bf16 tolerance of the float64 oracle (CPU and GPU)."""

import pytest
import torch
import torch.nn as nn

from tests.conftest import TOLERANCES
from tests.grad_sample.test_modes_exact import dp_clipped_step
from tests.oracle import microbatch_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

VOCAB, WIDTH = 97, 64


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(self.norm(h)).mean(dim=1)  # one prediction per sequence


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("autocast_device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("steps", [37, 1030])
@pytest.mark.parametrize("mode", ["ghost", "flash", "flash_fuse"])
def test_bf16_autocast_matches_float64(mode, steps, batch, autocast_device):
    torch.manual_seed(0)
    model = TinyLM()
    x, y = torch.randint(0, VOCAB, (batch, steps)), torch.randint(0, VOCAB, (batch,))
    clip = 1e-2
    oracle = microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), clip)
    dev = autocast_device
    with torch.autocast(dev, dtype=torch.bfloat16):
        dp_model, grads = dp_clipped_step(model.to(dev), x.to(dev), y.to(dev), mode=mode, reduction="sum",
                                          max_grad_norm=clip)

    rtol, _ = TOLERANCES["bf16"]
    norms = dp_model.get_norm_sample().double().cpu()
    assert _rel(norms, oracle.norms) < rtol, (norms, oracle.norms)
    for name, grad in grads.items():
        assert _rel(grad.double().cpu(), oracle.clipped_sum[name]) < rtol, name


def test_linear_inputs_are_kept_in_the_autocast_dtype():
    from flashnorm.grad_sample import GradSampleModuleFastGradientClippingFuse

    gsm = GradSampleModuleFastGradientClippingFuse(TinyLM())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gsm(torch.randint(0, VOCAB, (3, 5)))
    kept = {layer.name: gsm.step.inputs_of(layer)[0].dtype for layer in gsm.layers}
    assert kept["up"] == kept["down"] == kept["head"] == torch.bfloat16  # as autograd keeps them
    assert kept["norm"] == torch.float32 and kept["embed"] == torch.int64


def test_linear_layers_compute_with_the_one_cast_input_that_is_kept():
    """The kept X is the cast input the layer itself computed with (one cast and one copy, not two), and a
    float64 input, which autocast leaves alone, stays float64; outputs equal the unhooked model's."""
    from flashnorm.grad_sample import GradSampleModuleFastGradientClippingFuse

    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, VOCAB, (3, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(ids)
    gsm = GradSampleModuleFastGradientClippingFuse(model)
    received = {}
    for name in ("up", "head"):
        getattr(model, name).register_forward_hook(lambda m, inputs, out, name=name: received.__setitem__(name, inputs[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gsm(ids)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    kept = {layer.name: gsm.step.inputs_of(layer)[0] for layer in gsm.layers if gsm.step.inputs_of(layer)}
    for name in ("up", "head"):
        assert received[name].dtype == torch.bfloat16 and kept[name].data_ptr() == received[name].data_ptr(), name

    linear = GradSampleModuleFastGradientClippingFuse(nn.Sequential(nn.Linear(4, 3).double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(torch.randn(2, 5, 4, dtype=torch.float64))
    assert linear.step.inputs_of(linear.layers[0])[0].dtype == torch.float64
