"""The normalisation rules (flashnorm/norms/normalization.py): LayerNorm and RMSNorm over the last dim (the
affine-norm kernel's path) and over two dims (the general sums), GroupNorm over channels and positions, with
and without bias, a frozen weight, and Hugging Face's RMSNorm copies, against the float64 truth."""

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


def _hf_rms_norm(model: str):
    """``transformers``' RMSNorm of ``model`` (LlamaRMSNorm or one of its copies), with a non-default ε."""
    modeling = pytest.importorskip(f"transformers.models.{model.lower()}.modeling_{model.lower()}")
    return getattr(modeling, f"{model}RMSNorm")(C, eps=1e-3)


#: name → (layer, input shape after the batch for a length T).
LAYERS = {
    "layernorm": (lambda: nn.LayerNorm(C), lambda t: (t, C)),
    "layernorm_4d": (lambda: nn.LayerNorm(C), lambda t: (2, t, C)),
    "layernorm_nobias": (lambda: nn.LayerNorm(C, bias=False), lambda t: (t, C)),
    "layernorm_2dims": (lambda: nn.LayerNorm((3, C)), lambda t: (t, 3, C)),
    "rmsnorm": (lambda: nn.RMSNorm(C), lambda t: (t, C)),
    "rmsnorm_eps_none": (lambda: nn.RMSNorm(C, eps=None), lambda t: (t, C)),
    "rmsnorm_2dims": (lambda: nn.RMSNorm((3, C)), lambda t: (t, 3, C)),
    "hf_llama_rmsnorm": (lambda: _hf_rms_norm("Llama"), lambda t: (t, C)),
    "hf_qwen2_rmsnorm_4d": (lambda: _hf_rms_norm("Qwen2"), lambda t: (2, t, C)),
    "hf_gemma_rmsnorm": (lambda: _hf_rms_norm("Gemma"), lambda t: (t, C)),
    "hf_gemma2_rmsnorm_4d": (lambda: _hf_rms_norm("Gemma2"), lambda t: (2, t, C)),
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
    if name.startswith("hf_gemma") and dtype == "fp64":
        pytest.skip("Gemma's RMSNorm forms its gradient in float32 whatever its dtype: no float64 truth to match")
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


@pytest.mark.parametrize("model,rule", [("Llama", "HFRMSNormRule"), ("Qwen2", "HFRMSNormRule"),
                                        ("Gemma", "HFGemmaRMSNormRule"), ("Gemma3", "HFGemmaRMSNormRule")])
def test_hf_rms_norms_are_recognised_by_their_code(model, rule):
    """LlamaRMSNorm (w ⊙ cast(x̂)) and GemmaRMSNorm (cast(x̂ ⊙ (1 + w))) and their copies each get their rule;
    T5's layer norm (x̂ cast to the weight's dtype) has other code and takes the fallback."""
    assert type(get_norm_rule(_hf_rms_norm(model))).__name__ == rule
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    assert get_norm_rule(t5.T5LayerNorm(C)) is None


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_hf_gemma_rms_norm_in_16_bit_keeps_x_hat_in_float32(dtype, device):
    """A 16-bit Gemma RMSNorm multiplies x̂ by (1 + w) in float32 before the cast, so ∇w_b = Σ_t g_t ⊙ x̂_t with
    x̂ unrounded: what the layer itself returns in float32 when w = 0, for its input widened."""
    layer = _random_affine(_hf_rms_norm("Gemma")).to(device, dtype)
    x = torch.randn(3, 37, C, dtype=dtype, device=device) * 3
    g = torch.randn_like(x)
    grads = get_norm_rule(layer).per_sample_grads(layer, x, g)[layer.weight]
    with torch.no_grad():
        zero = _hf_rms_norm("Gemma").to(device)
        expected = (g.float() * zero(x.float())).sum(dim=1)
    assert grads.dtype == torch.float32
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_hf_rms_norm_in_16_bit_rounds_x_hat_as_the_layer(dtype, device):
    """A 16-bit HF RMSNorm multiplies w by x̂ rounded to the input dtype, so ∇w_b = Σ_t g_t ⊙ x̂_t with that
    rounded x̂, which the layer itself returns when its weight is 1; the rule's sums are float32."""
    layer = _random_affine(_hf_rms_norm("Llama")).to(device, dtype)
    x = torch.randn(3, 37, C, dtype=dtype, device=device) * 3
    g = torch.randn_like(x)
    grads = get_norm_rule(layer).per_sample_grads(layer, x, g)[layer.weight]
    with torch.no_grad():
        unit = _hf_rms_norm("Llama").to(device, dtype)
        expected = (g.float() * unit(x).float()).sum(dim=1)
    assert grads.dtype == torch.float32
    torch.testing.assert_close(grads, expected, rtol=1e-6, atol=1e-5)


def test_hf_rms_norm_without_its_epsilon_is_refused_by_the_rule_with_the_reason():
    """A copy whose ε is not a number (here None) is not the layer the rule's algebra describes: the rule says why,
    and discovery then puts the layer on the exact fallback."""
    layer = _hf_rms_norm("Llama")
    layer.variance_epsilon = None
    assert get_norm_rule(layer).supports(layer) == "it has no 1-D weight and float variance_epsilon"
