"""The step configuration (flashnorm/grad_sample/config.py): StepConfig.method plans a layer once per new shape (the
plan cached on the layer), replans when the shape or dtype changes, lets a forced method win where the layer's rule
has it, and keeps layers sharing a parameter off per-sample gradients unless forced."""

import pytest
import torch
import torch.nn as nn

from flashnorm.grad_sample import AssembleFromKept, FlashNormGradSampleModule, SecondBackward, config
from flashnorm.grad_sample.config import StepConfig
from tests.grad_sample.direct import Graph, per_sample_loss

D = 6


@pytest.fixture
def plans(monkeypatch):
    """Every call of the planner (config.choose), as (layer name, x shape)."""
    calls = []
    choose = config.choose
    monkeypatch.setattr(config, "choose", lambda *a, name, **k: (calls.append((name, tuple(a[2].shape))),
                                                                 choose(*a, name=name, **k))[1])
    return calls


def _layers(**modules):
    """{name: HookedLayer} of a module holding ``modules`` (its forward is never run)."""
    gsm = FlashNormGradSampleModule(Graph(lambda m, x: x, **modules), max_grad_norm=1.0)
    return {layer.name.split(".")[-1]: layer for layer in gsm.layers}


def _config(method=None, writer=SecondBackward):
    return StepConfig("torch", "flash", method, writer())


def _shapes(steps, p=D, dtype=torch.float64):
    """(x, G's shape, G's dtype) of a Linear(D, p) over ``steps`` positions, batch 3."""
    return torch.zeros(3, steps, D, dtype=dtype), (3, steps, p), dtype


def test_a_layer_is_planned_once_per_shape(plans):
    """Two-pass float64 Linear(6, 6), B = 3: Gram at T = 1 (rank one), flash at T = 5; the plan is cached on the layer
    for its last shape and dtype and made again when they change."""
    cfg, layer = _config(), _layers(lin=nn.Linear(D, D))["lin"]
    assert cfg.method(layer, *_shapes(5)) == "flash" and cfg.method(layer, *_shapes(5)) == "flash"
    assert plans == [("layers.lin", (3, 5, D))]
    assert layer.plan == (((3, 5, D), (3, 5, D), torch.float64), "flash")
    assert cfg.method(layer, *_shapes(1)) == "gram"
    assert cfg.method(layer, *_shapes(1)) == "gram"
    assert cfg.method(layer, *_shapes(5)) == "flash"
    assert cfg.method(layer, *_shapes(5, dtype=torch.float32)) == "flash"
    assert [shape for _, shape in plans] == [(3, 5, D), (3, 1, D), (3, 5, D), (3, 5, D)]


def test_a_given_output_gradient_is_planned_like_its_shape(plans):
    cfg, layer = _config(), _layers(lin=nn.Linear(D, D))["lin"]
    x, g_shape, dtype = _shapes(1)
    assert cfg.method(layer, x, g_shape, dtype, torch.randn(g_shape, dtype=dtype)) == "gram"
    assert cfg.method(layer, x, g_shape, dtype) == "gram" and len(plans) == 1


def test_the_one_pass_writer_plans_small_layers_per_sample():
    """AssembleFromKept may apply per-sample gradients: d·p ≤ T·(d + p) takes them; a two-pass writer never plans
    them (it would pay their memory for a norm)."""
    for writer, method in ((AssembleFromKept, "per_sample"), (SecondBackward, "flash")):
        assert _config(writer=writer).method(_layers(lin=nn.Linear(D, D))["lin"], *_shapes(5)) == method


@pytest.mark.parametrize("forced", ["flash", "gram", "per_sample"])
def test_a_forced_method_wins_where_the_rule_has_it(forced):
    """Linear has every method; LayerNorm only per-sample gradients and Embedding its exact norm besides (a forced
    method they lack is ignored for them; per-sample gradients every rule has)."""
    layers = _layers(lin=nn.Linear(D, D), norm=nn.LayerNorm(D), emb=nn.Embedding(11, D))
    cfg = _config(forced)
    assert cfg.method(layers["lin"], *_shapes(5)) == forced
    assert cfg.method(layers["norm"], *_shapes(5)) == "per_sample"
    ids = torch.zeros(3, 5, dtype=torch.long)
    expected = "per_sample" if forced == "per_sample" else "exact"
    assert cfg.method(layers["emb"], ids, (3, 5, D), torch.float64) == expected


def test_layers_sharing_a_parameter_keep_x_and_g_unless_forced():
    """Under the one-pass writer a tied pair is never planned per sample (its cross term needs X and G) unless that is
    the forced method; the untied head beside it is."""
    for forced, expected in ((None, ["flash", "flash", "per_sample"]), ("per_sample", ["per_sample"] * 3)):
        a, b = nn.Linear(D, D), nn.Linear(D, D)
        b.weight = a.weight
        layers = _layers(a=a, b=b, head=nn.Linear(D, D))
        assert layers["a"].shared and layers["b"].shared and not layers["head"].shared
        cfg = _config(forced, writer=AssembleFromKept)
        assert [cfg.method(layers[name], *_shapes(5)) for name in ("a", "b", "head")] == expected


def test_the_module_plans_each_shape_once_over_its_steps(plans):
    """Through the module: the same shapes step after step are planned once; a new sequence length is planned again."""
    model = Graph(lambda m, x: m["head"](torch.tanh(m["lin"](x))).mean(dim=1), lin=nn.Linear(D, D),
                  head=nn.Linear(D, 3)).double()
    gsm = FlashNormGradSampleModule(model, max_grad_norm=1.0)
    y = torch.randint(0, 3, (3,))
    for steps in (5, 5, 5, 7):
        gsm.clipped_backward(per_sample_loss(gsm(torch.randn(3, steps, D, dtype=torch.float64)), y))
    expected = [(name, (3, steps, D)) for name in ("layers.lin", "layers.head") for steps in (5, 7)]
    assert sorted(plans) == sorted(expected)
    assert {layer.plan[1] for layer in gsm.layers} == {"flash"}
