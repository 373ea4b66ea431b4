"""The norm planner (flashnorm/norms/planner.py): the forced method and where it comes from, the one-pass mode's
per-sample choice at its memory bounds, and which method a rule gets for a call. The crossover table of
``plan_linear`` (flash against Gram by T, B and dtype) is in tests/grad_sample/test_module.py."""

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from flashnorm.norms import get_norm_rule
from flashnorm.norms.planner import PER_SAMPLE_BUDGET_BYTES, Problem, choose, plan_linear, resolve_norm_method
from flashnorm.norms.registry import METHODS


@pytest.mark.parametrize("value,expected", [("flash", "flash"), (" Gram ", "gram"), ("PER_SAMPLE", "per_sample"),
                                            ("auto", None), ("", None)])
def test_a_forced_method_is_normalised_and_auto_lets_the_planner_choose(value, expected, monkeypatch):
    monkeypatch.setenv("FLASHNORM_NORM_METHOD", "gram")  # only the default: an explicit value wins
    assert resolve_norm_method(value) == expected


@pytest.mark.parametrize("env,expected", [(None, None), ("", None), ("flash", "flash"), ("Per_Sample", "per_sample")])
def test_without_a_value_the_environment_variable_is_the_default(env, expected, monkeypatch):
    if env is None:
        monkeypatch.delenv("FLASHNORM_NORM_METHOD", raising=False)
    else:
        monkeypatch.setenv("FLASHNORM_NORM_METHOD", env)
    assert resolve_norm_method(None) == expected


@pytest.mark.parametrize("value,source", [("bogus", "norm_method"), (None, "FLASHNORM_NORM_METHOD")])
def test_an_unknown_method_is_refused_naming_where_it_came_from(value, source, monkeypatch):
    monkeypatch.setenv("FLASHNORM_NORM_METHOD", "fast")
    with pytest.raises(ValueError) as err:
        resolve_norm_method(value)
    message = str(err.value)
    assert message.startswith(f"{source}=") and ("'bogus'" if value else "'fast'") in message
    assert all(method in message for method in ("auto", *METHODS))


@pytest.mark.parametrize("base", ["gram", "per_sample"])
def test_a_mode_whose_algorithm_is_not_flash_keeps_it(base):
    for problem in (Problem(1, 1, 8, 8), Problem(64, 4096, 4096, 4096), Problem(4, 40, 1024, 1024, element_bytes=2)):
        for fused in (False, True):
            assert plan_linear(problem, base=base, fused=fused) == base


def test_per_sample_gradients_when_they_take_no_more_memory_than_x_and_g():
    """One-pass mode: d·p ≤ T·(d + p) picks per-sample gradients (d = p = 1024: from T = 512 on), never in a
    two-pass mode."""
    assert plan_linear(Problem(2, 512, 1024, 1024), base="flash", fused=True) == "per_sample"
    assert plan_linear(Problem(2, 511, 1024, 1024), base="flash", fused=True) != "per_sample"
    assert plan_linear(Problem(2, 512, 1024, 1024), base="flash", fused=False) != "per_sample"


@pytest.mark.parametrize("element_bytes", [2, 4, 8])
def test_per_sample_gradients_stay_within_the_budget(element_bytes):
    """B·d·p elements of the layer's dtype up to PER_SAMPLE_BUDGET_BYTES; one sample more and the plan is not
    per-sample."""
    d = p = 512
    fits = PER_SAMPLE_BUDGET_BYTES // (d * p * element_bytes)
    assert plan_linear(Problem(fits, 4096, d, p, element_bytes), base="flash", fused=True) == "per_sample"
    assert plan_linear(Problem(fits + 1, 4096, d, p, element_bytes), base="flash", fused=True) == "flash"


def test_off_the_gpu_gram_wherever_it_takes_fewer_flops_than_flash():
    """The references form flash's per-sample gradients (2·B·T·d·p FLOPs, B·d·p elements written): off the GPU no
    multiprocessors are under-filled, and Gram (about 2·B·T²·(d + p)) is taken wherever T·(d + p) < d·p, within its
    float32 limit of 32 positions (any T in float64)."""
    proxy_fc = Problem(8, 16, 64, 256)  # the host proxy's c_fc: it under-fills a GPU, which then takes flash
    assert plan_linear(proxy_fc, base="flash", fused=False) == "flash"
    assert plan_linear(replace(proxy_fc, gpu=False), base="flash", fused=False) == "gram"
    assert plan_linear(replace(proxy_fc, gpu=False), base="flash", fused=True) == "gram"
    assert plan_linear(Problem(8, 32, 64, 256, gpu=False), base="flash", fused=False) == "gram"
    assert plan_linear(Problem(8, 33, 64, 256, gpu=False), base="flash", fused=False) == "flash"  # float32 limit
    assert plan_linear(Problem(8, 51, 64, 256, 8, gpu=False), base="flash", fused=False) == "gram"  # 51·320 < 64·256
    assert plan_linear(Problem(8, 52, 64, 256, 8, gpu=False), base="flash", fused=False) == "flash"
    assert plan_linear(Problem(8, 16, 1024, 1024, gpu=False), base="gram", fused=False) == "gram"
    layer = nn.Linear(64, 256)
    _, x, g = _call(layer, torch.randn(8, 16, 64))
    assert choose(get_norm_rule(layer), layer, x, g, base="flash", fused=False, override=None, name="fc") == "gram"


def _call(layer, x):
    with torch.no_grad():
        return layer, x, torch.randn_like(layer(x))


def test_a_forced_method_the_rule_has_is_used():
    layer, x, g = _call(nn.Linear(6, 5), torch.randn(3, 7, 6))
    rule = get_norm_rule(layer)
    for method in ("flash", "gram", "per_sample"):
        assert choose(rule, layer, x, g, base="flash", fused=False, override=method, name="fc") == method


@pytest.mark.parametrize("layer,x,own", [
    (nn.LayerNorm(6), torch.randn(3, 7, 6), "per_sample"),
    (nn.Embedding(11, 6), torch.randint(0, 11, (3, 7)), "exact"),
])
def test_a_forced_method_the_rule_lacks_gives_way_to_the_rules_own(layer, x, own):
    layer, x, g = _call(layer, x)
    rule = get_norm_rule(layer)
    assert choose(rule, layer, x, g, base="flash", fused=True, override="gram", name="layer") == own
    assert choose(rule, layer, x, g, base="flash", fused=True, override=None, name="layer") == own
    # per-sample gradients: every rule can, and a per-sample mode asks for them
    assert choose(rule, layer, x, g, base="flash", fused=True, override="per_sample", name="layer") == "per_sample"
    assert choose(rule, layer, x, g, base="per_sample", fused=True, override="gram", name="layer") == "per_sample"


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_a_forced_method_a_linear_layer_gets_the_plan_of_its_sizes(fused, dtype, caplog):
    """The plan of the call's flattened (B, T, d, p) and element size, logged at DEBUG level with the layer's name."""
    layer, x, g = _call(nn.Linear(6, 5).to(dtype), torch.randn(3, 2, 7, 6, dtype=dtype))
    rule = get_norm_rule(layer)
    expected = plan_linear(Problem(3, 14, 6, 5, g.element_size(), gpu=x.is_cuda), base="flash", fused=fused)
    with caplog.at_level(logging.DEBUG, logger="flashnorm.norms.planner"):
        assert choose(rule, layer, x, g, base="flash", fused=fused, override=None, name="blocks.0.fc") == expected
    assert rule.sizes(layer, x, g) == (3, 14, 6, 5)
    assert any("blocks.0.fc" in r.getMessage() and r.getMessage().endswith(f"-> {expected}") for r in caplog.records)
