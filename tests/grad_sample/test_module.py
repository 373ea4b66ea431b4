"""The grad-sample modules used directly: what each pass computes, hooks on/off, the planner."""

import pytest
import torch
import torch.nn as nn

from flashnorm.grad_sample import GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse
from flashnorm.norms.planner import Problem, plan_linear
from flashnorm.optimizers import DPOptimizerFastGradientClipping
from flashnorm.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from tests.grad_sample.direct import TwoHeads as _TwoHeads
from tests.grad_sample.direct import wrap as _wrap
from tests.zoo import build


def _count_accumulations(model):
    counts = {"n": 0}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _p: counts.__setitem__("n", counts["n"] + 1))
    return counts


def _count_accumulator_runs(model):
    """Counts the runs of the parameters' gradient accumulators through hooks on autograd's AccumulateGrad nodes
    (kept alive here), for the DP loss's backward, which refuses parameters with hooks of their own."""
    counts = {"n": 0, "nodes": []}
    for p in model.parameters():
        node = p.view_as(p).grad_fn.next_functions[0][0]
        node.register_hook(lambda *_: counts.__setitem__("n", counts["n"] + 1))
        counts["nodes"].append(node)
    return counts


@pytest.mark.parametrize("kind", ["linear3d", "conv2d", "embedding", "layernorm", "dp_mha", "fallback"])
def test_norm_pass_computes_no_parameter_gradient(kind):
    model, x, y = build(kind, 37)
    gsm, _, criterion = _wrap(GradSampleModuleFastGradientClipping, model)
    counts = _count_accumulations(model)
    loss = criterion(gsm(x), y)
    gsm.compute_clipping_coef(loss.loss_per_sample)
    assert counts["n"] == 0 and all(p.grad is None for p in model.parameters())
    gsm.write_clipped_gradients(loss.loss_per_sample, gsm.get_clipping_coef())  # pass 2: ordinary backward
    assert counts["n"] == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("method", ["flash", "gram", "per_sample"])
@pytest.mark.parametrize("kind", ["linear3d", "conv2d", "embedding", "layernorm", "dp_mha", "fallback"])
def test_one_pass_backward_computes_no_parameter_gradient(kind, method):
    model, x, y = build(kind, 37)
    gsm, opt, criterion = _wrap(GradSampleModuleFastGradientClippingFuse, model, norm_method=method)
    counts = _count_accumulator_runs(model)
    criterion(gsm(x), y).backward()
    assert counts["n"] == 0, "autograd accumulated a parameter gradient during the one-pass backward"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_disabled_hooks_train_like_the_plain_module():
    model, x, y = build("linear3d", 5)
    gsm, _, _ = _wrap(GradSampleModuleFastGradientClippingFuse, model)
    gsm.disable_hooks()
    nn.functional.cross_entropy(gsm(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("cls", [GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse])
def test_a_wrapped_model_deep_copies_after_a_step(cls, device):
    """copy.deepcopy of the user's model (reaching the grad-sample module through its hooks) after a step: the
    step's loss check (a CUDA event on the GPU) is shared, not copied; the copy computes what the model does."""
    import copy

    model, x, y = build("linear3d", 5)
    model, x, y = model.to(device), x.to(device), y.to(device)
    gsm, opt, criterion = _wrap(cls, model)
    criterion(gsm(x), y).backward()
    opt.step()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="loss_reduction"):
        GradSampleModuleFastGradientClipping(nn.Linear(2, 2), loss_reduction="avg")
    with pytest.raises(ValueError, match="norm_method"):
        GradSampleModuleFastGradientClipping(nn.Linear(2, 2), norm_method="fast")
    with pytest.raises(ValueError, match="max_grad_norm"):
        GradSampleModuleFastGradientClipping(nn.Linear(2, 2), max_grad_norm=[1.0, 2.0])


def test_planner_choices():
    # d = p = 1024: T* = 2dp/(d+p) = 1024; 64 output tiles of 128², so B = 4 fills the 132 SMs (κ = 0.5).
    assert plan_linear(Problem(4, 400, 1024, 1024, element_bytes=8), base="flash", fused=False) == "gram"
    assert plan_linear(Problem(4, 600, 1024, 1024, element_bytes=8), base="flash", fused=False) == "flash"
    assert plan_linear(Problem(4, 4096, 1024, 1024), base="flash", fused=False) == "flash"
    # Below float64, Gram only up to 32 positions (its float32 rounding, norms.rounding).
    assert plan_linear(Problem(4, 32, 1024, 1024), base="flash", fused=False) == "gram"
    assert plan_linear(Problem(4, 33, 1024, 1024), base="flash", fused=False) == "flash"
    assert plan_linear(Problem(4, 400, 1024, 1024, element_bytes=2), base="flash", fused=False) == "flash"
    # B = 1 under-fills: κ = 1.0, and never Gram at T <= 256 (too few programs).
    assert plan_linear(Problem(1, 1000, 1024, 1024, element_bytes=8), base="flash", fused=False) == "gram"
    assert plan_linear(Problem(1, 1200, 1024, 1024, element_bytes=8), base="flash", fused=False) == "flash"
    assert plan_linear(Problem(1, 1200, 1024, 1024, element_bytes=2), base="flash", fused=False) == "flash"
    assert plan_linear(Problem(1, 200, 1024, 1024, element_bytes=8), base="flash", fused=False) == "flash"
    assert plan_linear(Problem(1, 1, 1024, 1024), base="flash", fused=False) == "gram"  # rank one
    assert plan_linear(Problem(1, 4096, 1024, 1024), base="flash", fused=True) == "per_sample"
    assert plan_linear(Problem(64, 4096, 4096, 4096), base="flash", fused=True) == "flash"  # over the budget
    assert plan_linear(Problem(4, 4096, 1024, 1024), base="gram", fused=True) == "gram"


def test_forced_method_env_is_read_at_construction(monkeypatch):
    """FLASHNORM_NORM_METHOD is only the default of norm_method: read (and refused) when the module is built."""
    model, x, y = build("linear3d", 5)
    monkeypatch.setenv("FLASHNORM_NORM_METHOD", "bogus")
    with pytest.raises(ValueError, match="FLASHNORM_NORM_METHOD='bogus'"):
        _wrap(GradSampleModuleFastGradientClippingFuse, model)
    monkeypatch.setenv("FLASHNORM_NORM_METHOD", "gram")
    gsm, _, criterion = _wrap(GradSampleModuleFastGradientClippingFuse, model)
    assert gsm.norm_method == "gram"
    monkeypatch.setenv("FLASHNORM_NORM_METHOD", "per_sample")  # later changes do not reach a built module
    criterion(gsm(x), y).backward()
    assert {layer.plan[1] for layer in gsm.layers if isinstance(layer.module, nn.Linear)} == {"gram"}
    explicit, _, _ = _wrap(GradSampleModuleFastGradientClippingFuse, model, norm_method="flash")
    assert explicit.norm_method == "flash", "the argument beats the environment"


def test_eval_forward_between_forward_and_backward_keeps_the_step():
    """An evaluation forward (eval mode or no_grad) must not drop the captured inputs: norms stay exact."""
    from tests.oracle import microbatch_reference

    model, x, y = build("linear3d", 37)
    model = model.double()
    x = x.double()
    oracle = microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), 0.1)
    gsm, opt, criterion = _wrap(GradSampleModuleFastGradientClippingFuse, model)
    out = gsm(x)
    with torch.no_grad():
        gsm(x[:2])
    gsm.eval()
    gsm(x[:1])
    gsm.train()
    criterion(out, y).backward()
    torch.testing.assert_close(gsm.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse])
def test_backward_of_an_older_forward_is_a_clear_error(cls):
    model, x, y = build("linear3d", 5)
    gsm, _, criterion = _wrap(cls, model)
    stale = criterion(gsm(x), y)
    gsm(x)  # a second training forward replaces the captured inputs
    with pytest.raises(RuntimeError, match="in pairs"):
        stale.backward()


@pytest.mark.parametrize("cls", [GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse])
def test_trainable_layer_in_eval_mode_is_still_counted(cls):
    """A trainable layer left in eval mode inside a training forward still receives gradients: its norm counts."""
    from tests.oracle import microbatch_reference

    model, x, y = build("layernorm", 37)
    model, x = model.double(), x.double()
    oracle = microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), 0.1)
    gsm, opt, criterion = _wrap(cls, model)
    model[1].eval()  # e.g. a user freezing a sub-block's dropout/statistics, not its parameters
    criterion(gsm(x), y).backward()
    torch.testing.assert_close(gsm.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)


class _FunctionallyTiedLM(nn.Module):
    """The LM head reads the embedding table directly: a parameter used outside its module."""

    def __init__(self, vocab=11, width=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.wte(ids)))
        return nn.functional.linear(h, self.wte.weight).mean(dim=1)


@pytest.mark.parametrize("cls", [GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse])
def test_parameter_used_outside_its_layer_is_a_clear_error(cls):
    gsm, _, criterion = _wrap(cls, _FunctionallyTiedLM())
    ids = torch.randint(0, 11, (3, 5))
    with pytest.raises(NotImplementedError, match=r"\['wte'\].*outside"):
        criterion(gsm(ids), torch.randint(0, 11, (3,))).backward()


def test_parameter_used_outside_its_layer_is_exact_for_one_sample():
    """With B = 1 the one-pass mode takes an ordinary backward, which sees every use: exact."""
    from tests.oracle import microbatch_reference

    model = _FunctionallyTiedLM().double()
    ids, y = torch.randint(0, 11, (1, 5)), torch.randint(0, 11, (1,))
    oracle = microbatch_reference(model, ids, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), 0.1)
    gsm, opt, criterion = _wrap(GradSampleModuleFastGradientClippingFuse, model)
    criterion(gsm(ids), y).backward()
    torch.testing.assert_close(gsm.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_one_pass_assembles_weights_with_the_fused_kernel(monkeypatch, device):
    """FLASHNORM_BACKEND=triton (the interpreter on CPU): norms by the flash kernel and weight gradients by the
    fused (c ⊙ G)ᵀX kernel, whose float32 result becomes the parameter's gradient; exact against float64."""
    from tests.conftest import fp32_tolerance
    from tests.oracle import microbatch_reference

    from flashnorm.kernels import clipped_grad

    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
    fused_calls = []
    fused = clipped_grad.clipped_weight_grad_fused
    monkeypatch.setattr(clipped_grad, "clipped_weight_grad_fused", lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    model = _TwoHeads(use_second=True).to(device)
    x, y = torch.randn(4, 7, 6, device=device), torch.randint(0, 3, (4,), device=device)
    oracle = microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), 0.1)
    gsm, _, criterion = _wrap(GradSampleModuleFastGradientClippingFuse, model, norm_method="flash")
    criterion(gsm(x), y).backward()
    assert len(fused_calls) == 3, "every Linear weight is assembled by the fused kernel"
    rtol, atol = fp32_tolerance(device)
    torch.testing.assert_close(gsm.get_norm_sample().double(), oracle.norms, rtol=rtol, atol=atol)
    for name, p in model.named_parameters():
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad.double(), oracle.clipped_sum[name], rtol=rtol, atol=atol)


@pytest.mark.parametrize("cls", [GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse])
def test_non_finite_loss_discards_the_gradients_on_the_device(cls, device):
    """The finiteness flag travels to the host behind the forward (pinned copy on CUDA) and is read at the end."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(device)
    gsm, _, criterion = _wrap(cls, model)
    x, y = torch.randn(3, 6, device=device), torch.randint(0, 3, (3,), device=device)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        criterion(gsm(bad), y).backward()
    assert all(p.grad is None for p in model.parameters())
    criterion(gsm(x), y).backward()  # the next step works
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_single_sample_norm_is_not_rounded_to_a_bf16_gradient_dtype():
    """B = 1 with bf16 parameters: the norm of the (bf16) gradients is accumulated and kept in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3)).to(torch.bfloat16)
    gsm = GradSampleModuleFastGradientClippingFuse(model, max_grad_norm=1e6)
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                          max_grad_norm=1e6, expected_batch_size=1)
    criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(reduction="mean"))
    x, y = torch.randn(1, 16, dtype=torch.bfloat16), torch.randint(0, 3, (1,))
    criterion(gsm(x), y).backward()
    norm = gsm.get_norm_sample()
    assert norm.dtype == torch.float32
    exact = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))  # no clipping: c = 1
    assert abs(norm.item() - exact.item()) <= 1e-6 * exact.item()


def test_clipped_sums_keep_the_coefficients_in_float32():
    """c_b = 1 - 2⁻¹⁰ rounds to 1.0 in bf16: a clipped sum in the gradient dtype would exceed c_b·g_b."""
    from flashnorm.norms.embedding import EmbeddingRule
    from flashnorm.norms.registry import clipped_from_per_sample

    coef = torch.full((1,), 1 - 2**-10)
    weight = nn.Parameter(torch.zeros(4, 3))
    out = clipped_from_per_sample({weight: torch.ones(1, 4, 3, dtype=torch.bfloat16)}, coef)[weight]
    assert torch.all(out == coef[0])
    emb = nn.Embedding(5, 3)
    grads = EmbeddingRule().clipped_grads(emb, torch.tensor([[2]]), torch.ones(1, 1, 3, dtype=torch.bfloat16), coef)
    assert torch.all(grads[emb.weight][2] == coef[0])
