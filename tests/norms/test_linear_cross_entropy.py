"""The fused head in DP steps (its norm rule, flashnorm/norms/linear_cross_entropy.py, and the tied cross term)
against the float64 oracle: each sample's gradient over ALL trainable parameters by ordinary autograd through the
unfused head, clipped to C and summed. Every clipping mode, tied and untied, both loss reductions, odd T, a
vocabulary that is not a multiple of the block, ignored targets; the influence of one sample ≤ C(1 + 1e-3)."""

import os

import pytest
import torch
import torch.nn as nn

import flashnorm.layers.linear_cross_entropy as head_module
from flashnorm.layers import FusedLinearCrossEntropy
from flashnorm.norms import rounding
from tests.conftest import CLIPPING_MODES, TOLERANCES
from tests.grad_sample.guarantee import Attempt, influence
from tests.layers.head import (
    TinyLM, batch, dp_step, head_options_of, make_private, oracle, oracle_per_sample, per_sample_cross_entropy,
)

STEPS = (1, 37, 600, 1030)
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def assert_step_exact(model, ids, labels, mode, reduction, clip, dtype, exact_coefficient=True):
    """One DP step of ``model`` equals the float64 oracle: its norms, and the applied gradients Σ_b c_b g_b (÷ B for
    ``mean``) with g_b the oracle's per-sample gradients. ``exact_coefficient``: c_b is Opacus's min(1, C/(‖g_b‖ +
    10⁻⁶)); else (float32 at long T, where the rounding allowance of flashnorm/norms/rounding.py may lower it) c_b
    lies within 0.3 % below it, never above."""
    expected = oracle(model, ids, labels, clip)
    per_sample = oracle_per_sample(model, ids, labels)
    dp_model, grads = dp_step(model, mode, ids, labels, clip, reduction)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(dp_model.get_norm_sample().double(), expected.norms, rtol=rtol, atol=atol)
    opacus = torch.clamp(clip / (expected.norms + 1e-6), max=1.0)
    coef = dp_model.get_clipping_coef().double()
    if exact_coefficient:
        torch.testing.assert_close(coef, opacus, rtol=rtol, atol=atol)
    else:
        assert (coef <= opacus * (1 + rtol)).all() and (coef >= opacus * (1 - 3e-3)).all(), (coef / opacus).tolist()
    scale = ids.shape[0] if reduction == "mean" else 1
    failures = []
    for name, grad in grads.items():
        want = torch.einsum("b,b...->...", coef, per_sample[name]) / scale
        if not torch.allclose(grad.double(), want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item())):
            failures.append(f"{name}: max abs err {(grad.double() - want).abs().max().item():.3e}")
    assert not failures, "; ".join(failures)
    return expected, dp_model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_step_matches_float64_microbatch(mode, tied, steps, reduction, dtype):
    """V = 1000 in blocks of 96 (the last one 40 wide), d = 8, B = 4 with ignored targets (sample 2: all of them);
    the untied head has a bias; label smoothing 0.1. Clipping active for every sample with a target. The coefficient
    is Opacus's, the tied head's cross term included (its rounding bound, flashnorm/norms/tied.py, stays within the
    allowance), except in float32 at T = 1030 untied, where the bias's rounding may lower it (by 2·10⁻⁴)."""
    torch.manual_seed(0)
    model = TinyLM(1000, 8, tied=tied, bias=not tied, shift=steps > 1, token_reduction=reduction,
                   label_smoothing=0.1, vocab_block=96).to(DTYPES[dtype])
    ids, labels = batch(1000, 4, steps)
    if steps == 1:
        labels[2] = 5  # (one position per sample: sample 1 is ignored already)
    expected, _ = assert_step_exact(model, ids, labels, mode, reduction, 1e-2, dtype,
                                    exact_coefficient=dtype == "fp64" or steps <= 600 or tied)
    scored = (labels != -100).any(dim=1) if steps == 1 else (labels[:, 1:] != -100).any(dim=1)
    assert (expected.norms[scored] > 1e-2).all() and (expected.norms[~scored] == 0).all()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_gpt2_vocabulary(mode, tied):
    """V = 50257 (GPT-2's) in blocks of 4096 at tiny d and T, float64."""
    torch.manual_seed(0)
    model = TinyLM(50257, 4, tied=tied, shift=True, vocab_block=4096).double()
    ids, labels = batch(50257, 3, 6)
    assert_step_exact(model, ids, labels, mode, "sum", 1e-3, "fp64")


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="the interpreter's test (CPU tensors); on a GPU "
                    "the compiled kernels' DP step is tests/kernels/test_linear_cross_entropy_gpu.py's")
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_step_with_the_triton_kernels(mode, tied, monkeypatch):
    """The head on its Triton kernels (the interpreter on CPU; ``FLASHNORM_BACKEND=triton`` for the norm and
    clipped-gradient kernels too), float32: exact against the float64 oracle."""
    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
    torch.manual_seed(0)
    model = TinyLM(150, 8, tied=tied, bias=not tied, shift=True, label_smoothing=0.1, vocab_block=64)
    ids, labels = batch(150, 3, 19)
    assert_step_exact(model, ids, labels, mode, "mean", 1e-2, "fp32")


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_tied_embedding_with_padding_idx(mode):
    """The embedding's rows at ``padding_idx`` get no gradient: the cross term leaves those positions out."""
    model = TinyLM(120, 6, tied=True, shift=True, vocab_block=32).double()
    model.embed.padding_idx = 0
    ids, labels = batch(120, 3, 17)
    ids[:, ::3] = 0
    labels[:, 1::4] = 0  # the padding id as a target too: the head's gradient reaches its row
    assert_step_exact(model, ids, labels, mode, "sum", 1e-2, "fp64")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_bf16_autocast_within_bf16_tolerance(mode, tied, device):
    """A float32 model under bf16 autocast (the forward pre-hook hands the head bf16 hidden states; its weight is
    cast as autocast casts a linear's): norms and applied gradients within bf16's tolerance, norm-wise, of the
    float64 oracle."""
    torch.manual_seed(0)
    model = TinyLM(300, 16, tied=tied, bias=not tied, shift=True, vocab_block=128)
    ids, labels = batch(300, 3, 37)
    expected = oracle(model, ids, labels, 1e-2)
    with torch.autocast(device, dtype=torch.bfloat16):
        dp_model, grads = dp_step(model.to(device), mode, ids.to(device), labels.to(device), 1e-2, "sum")
    rtol, _ = TOLERANCES["bf16"]

    def relative(got, want):
        return ((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)).item()

    assert relative(dp_model.get_norm_sample(), expected.norms) < rtol
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and relative(grad, expected.clipped_sum[name]) < rtol, name


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_tied_scaled_embedding(mode):
    """Gemma's embedding (a lookup times embed_scale, its own rule): the cross term takes the lookup's gradient."""
    modeling_gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    model = TinyLM(120, 6, tied=False, shift=True, vocab_block=32).double()
    model.embed = modeling_gemma.GemmaTextScaledWordEmbedding(120, 6, padding_idx=0, embed_scale=6**0.5).double()
    model.lm_head.weight = model.embed.weight
    model.head.weight = model.embed.weight
    ids, labels = batch(120, 3, 17)
    assert_step_exact(model, ids, labels, mode, "sum", 1e-2, "fp64")


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_single_sample_batch(mode):
    """B = 1: no capture, one ordinary backward through the head's own backward (X̄ and ∇W in one pass), the
    gradient clipped as a whole."""
    model = TinyLM(300, 8, tied=True, shift=True, vocab_block=128).double()
    ids, labels = batch(300, 1, 37)
    _, dp_model = assert_step_exact(model, ids, labels, mode, "mean", 1e-2, "fp64")
    assert not dp_model.taps, "a batch of one sample needs no capture, no norm pass"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_per_sample_method_forced(tied, monkeypatch):
    """``FLASHNORM_NORM_METHOD=per_sample``: the head's per-sample gradients (B·V·d) are exact too."""
    monkeypatch.setenv("FLASHNORM_NORM_METHOD", "per_sample")
    model = TinyLM(200, 6, tied=tied, bias=not tied, shift=True, vocab_block=64).double()
    ids, labels = batch(200, 3, 11)
    for mode in CLIPPING_MODES:
        assert_step_exact(model, ids, labels, mode, "sum", 1e-2, "fp64")


def test_frozen_weight_trainable_bias():
    """A frozen untied head weight with a trainable bias: the bias alone is counted and clipped."""
    model = TinyLM(200, 6, tied=False, bias=True, shift=True, vocab_block=64).double()
    model.lm_head.weight.requires_grad_(False)
    ids, labels = batch(200, 3, 11)
    for mode in CLIPPING_MODES:
        assert_step_exact(model, ids, labels, mode, "sum", 1e-2, "fp64")


@pytest.mark.parametrize("tied,passes", [(False, 2), (True, 3)], ids=["untied", "tied"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_passes_over_the_vocabulary(mode, tied, passes, monkeypatch):
    """A step forms each logit-gradient tile ``passes`` times: once for the norms and X̄ together (the layer's
    backward in the norm pass computes nothing: no ∇W there), once to write the clipped gradient, and once more for
    the tied cross term."""
    formed = []
    original = head_module.logit_grad_block
    monkeypatch.setattr(head_module, "logit_grad_block", lambda *a, **k: formed.append(1) or original(*a, **k))
    model = TinyLM(200, 6, tied=tied, shift=True, vocab_block=64).double()  # 4 blocks, one group of samples
    ids, labels = batch(200, 3, 11)
    dp_model, optimizer, criterion, _ = make_private(model, mode, ids, labels, 1e-2, "sum")
    loss = criterion(dp_model(ids, labels))
    assert not formed, "the forward pass forms no gradient"
    loss.backward()
    assert len(formed) == 4 * passes


def _measured(head, x, y):
    """(‖ĝ_b‖ as the rule measures it in x's dtype, its rounding scale s_b and n) after one call of ``head``."""
    from flashnorm.norms import get_norm_rule

    rule = get_norm_rule(head)
    with torch.no_grad():
        head(x, y)
    rule.remember_call(x, (y,), {}, True, layer=head)
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    norm = rule.norm_sq(head, x, ones, "exact").sqrt()
    return (norm, *rule.rounding_scale(head, x, ones))


def test_scale_bounds_the_float32_rounding_of_cancelling_positions():
    """Sample 1: hidden states ±10⁸ along a direction every row of W ignores (so their logits, and their G rows, are
    equal), then one ordinary position: the per-sample sums cancel to that position's term, their float32 rounding
    does not, and stays within γ_T·s_b."""
    torch.manual_seed(0)
    vocab, d, steps = 20, 3, 9
    weight = nn.Parameter(torch.randn(vocab, d))
    weight.data[:, 0] = 0
    head = FusedLinearCrossEntropy(weight, token_reduction="sum")
    x = torch.randn(2, steps, d)
    y = torch.randint(0, vocab, (2, steps))
    x[1, :8] = 0
    x[1, 0:8:2, 0], x[1, 1:8:2, 0] = 1e8, -1e8
    y[1, :8] = 4
    computed, s, terms = _measured(head, x, y)
    exact, _, _ = _measured(FusedLinearCrossEntropy(nn.Parameter(weight.detach().double()), token_reduction="sum"),
                            x.double(), y)
    radius = rounding.gamma(terms, 2, torch.float32) * s.double()
    assert terms == steps
    assert ((computed.double() - exact).abs() <= radius).all(), (computed, exact, radius)
    assert radius[1] > 10 * exact[1], "the cancelling sample's rounding dwarfs its gradient"


def test_scale_covers_the_rows_of_the_gradient_formed():
    """s_b ≥ Σ_t ‖G_t‖·(‖x_t‖ + 1) (weight and bias trainable) for the G the passes form, in float64 from the
    rule's own G rows: the quantity the rounding model needs."""
    torch.manual_seed(0)
    linear = nn.Linear(5, 37)
    head = FusedLinearCrossEntropy.from_linear(linear, label_smoothing=0.1, vocab_block=16)
    x, y = torch.randn(3, 11, 5), torch.randint(0, 37, (3, 11))
    y[1, :4] = -100
    _, s, _ = _measured(head, x, y)
    exact = head_module.tile_pass(x.double(), linear.weight.double(), linear.bias.double(),
                                  _record(head, x, y), torch.ones(3, dtype=torch.float64), row_norms=True)
    rows = exact.row_norm_sq.sqrt().view(3, 11) * (x.double().norm(dim=-1) + 1)
    assert (s.double() >= rows.sum(dim=1) * (1 - 1e-6)).all() and (s.double() <= 1.01 * rows.sum(dim=1)).all()


def _record(head, x, y):
    """The record of a float64 call on (x, y) (lse included)."""
    x64, w, b, call = head_module.prepare_call(x.double(), head.weight.double(), head.bias.double(), y,
                                               token_reduction=head.token_reduction,
                                               label_smoothing=head.label_smoothing, vocab_block=head.vocab_block)
    head_module.head_losses(x64, w, b, call)
    return call


def test_second_backward_never_takes_the_norm_pass_input_gradient():
    """Hidden states that require grad with no hooked layer before the head (a leaf input): the norm pass keeps X̄
    for a backward that does not run; the two-pass write then back-propagates c_b·∂ℓ_b and must compute its own X̄,
    Σ_b c_b ∂ℓ_b/∂x, not the kept one (of Σ_b ∂ℓ_b/∂x)."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 40)
    head = FusedLinearCrossEntropy.from_linear(linear, token_reduction="sum", vocab_block=16).double()
    x = torch.randn(3, 9, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (3, 9))
    dp_model, optimizer, criterion, _ = make_private(head, "ghost", x, y, 1e-2, "sum")
    criterion(dp_model(x, y)).backward()
    coef = dp_model.get_clipping_coef().double()
    plain = x.detach().clone().requires_grad_()
    loss = head_module.fused_linear_cross_entropy(plain, linear.weight.double(), y, linear.bias.double(),
                                                  token_reduction="sum")
    (want,) = torch.autograd.grad((coef * loss).sum(), [plain])
    assert (coef < 1).all()
    torch.testing.assert_close(x.grad, want, rtol=1e-10, atol=1e-12)


def test_captured_input_without_record_is_refused():
    """The rule finds each captured input's call record; a stranger input gets a clear error."""
    from flashnorm.norms import get_norm_rule

    head = FusedLinearCrossEntropy(nn.Parameter(torch.randn(5, 3)))
    with pytest.raises(RuntimeError, match="no record of the call"):
        get_norm_rule(head).norm_sq(head, torch.randn(2, 4, 3), torch.ones(2), "exact")


# -- the guarantee: one sample's influence ≤ C(1 + 1e-3) -----------------------------------------------------------
C = 1e-3


class FloatLM(nn.Module):
    """x [B, T, d] floats → Linear(d, d) → the fused head (with bias): an adversary controls the hidden states."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab)
        self.head = FusedLinearCrossEntropy.from_linear(self.lm_head, vocab_block=64, token_reduction="sum")

    def forward(self, x, labels):
        return self.head(self.proj(x), labels)


def _attempts(build, mode):
    def make(b):
        model = build()
        dp_model, optimizer, criterion, _ = make_private(model, mode, *b, C, "sum")

        def act():
            criterion(dp_model(*b)).backward()
            optimizer.step()

        return Attempt(model, act)

    return make


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_influence_of_huge_hidden_states(mode, dtype):
    """The last sample's inputs are 10³× larger and its targets all one wrong token: its influence on what the
    optimizer applies (noise 0) stays ≤ C(1 + 1e-3), in float32 too (the rounding allowance)."""
    dtype = DTYPES[dtype]

    def build():
        torch.manual_seed(0)
        return FloatLM(150, 6).to(dtype)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 37, 6, generator=gen, dtype=dtype)
    labels = torch.randint(0, 150, (4, 37), generator=gen)
    x[-1] *= 1e3
    labels[-1] = 7
    measured = influence(_attempts(build, mode), ((x, labels), (x[:-1], labels[:-1])), clip=C)
    assert measured is not None and measured > 0.5 * C, "the adversarial sample must be clipped, not vanish"


def _cross_truth(embedding_rule, embedding, ids, g_embedding, head_rule, head, x, g) -> torch.Tensor:
    """⟨∇^embedding ℓ_b, ∇^head ℓ_b⟩ [B] in float64 from a step's captures (ordinary float64 sums, never the cross
    term's code): the embedding's per-sample gradients from its ids and output gradient, the head's from its input
    and the logits' gradient as the step formed it (the fused head's G, regenerated by its own kernel: the rounding
    allowance takes G as formed)."""
    from flashnorm.kernels.linear_cross_entropy import logit_grad_block

    e = embedding_rule.lookup_grad(embedding, g_embedding).double()  # [B, T', d]
    grad_embedding = torch.stack([torch.zeros_like(embedding.weight, dtype=torch.float64).index_add_(0, ids[b], e[b])
                                  for b in range(ids.shape[0])])
    if not isinstance(head, FusedLinearCrossEntropy):
        xs, gs = head_rule.as_sequences(head, x, g)  # [B, T, d], [B, T, V]
        grad_head = torch.einsum("btv,btd->bvd", gs.double(), xs.double())
    else:
        call = head_rule._call(x)
        xs, weight, bias = head_rule._operands(head, x, call)
        batch, steps, _ = xs.shape
        logits_grad = logit_grad_block(xs.reshape(batch * steps, -1), 0, batch * steps, weight, bias, 0,
                                       weight.shape[0], call.lse, call.targets, call.alpha, call.keep, call.spread)
        grad_head = torch.einsum("btv,btd->bvd", logits_grad.double().view(batch, steps, -1), xs.double())
        grad_head = grad_head * g.double().view(-1, 1, 1)
    return (grad_embedding * grad_head).flatten(1).sum(dim=1)


@pytest.mark.parametrize("head", ["fused", "unfused"])
def test_tied_cross_term_within_its_rounding_bound(monkeypatch, head):
    """float32, T = 600, the last sample one token repeated with itself as target (all its embedding gradient on
    one row of the vocabulary): each sample's cross term ⟨∇^embedding, ∇^head⟩ as the step computes it lies within
    its `CrossTerm.error` of the float64 one from the same captures, for the fused head's float32 sums and the
    unfused form's float64 ones."""
    import flashnorm.grad_sample.norm_pass as norm_pass
    import flashnorm.norms.tied as tied

    seen = []

    def recorded(rule_a, layer_a, x_a, g_a, rule_b, layer_b, x_b, g_b, param, backend=None):
        cross = tied.cross_term(rule_a, layer_a, x_a, g_a, rule_b, layer_b, x_b, g_b, param, backend=backend)
        uses = [(rule_a, layer_a, x_a, g_a), (rule_b, layer_b, x_b, g_b)]
        if not isinstance(layer_a, nn.Embedding):
            uses.reverse()
        seen.append((cross, _cross_truth(*uses[0], *uses[1])))
        return cross

    monkeypatch.setattr(norm_pass, "cross_term", recorded)
    torch.manual_seed(0)
    model = (TinyLM if head == "fused" else UnfusedLM)(150, 6, tied=True, shift=True, vocab_block=64)
    ids, labels = batch(150, 4, 600, ignored=False)
    ids[-1], labels[-1] = 3, 3
    dp_step(model, "flash_fuse", ids, labels, 1e-3, "sum")
    ((cross, truth),) = seen
    off = (cross.value.double() - truth).abs()
    assert cross.value.dtype == torch.float32 and (off <= cross.error.double()).all(), (off, cross.error)
    assert (off > 0).any(), "the cross term rounds: the check has something to bound"


class UnfusedLM(TinyLM):
    """TinyLM's loss from its full logits (the ``lm_head`` Linear's rule and the unfused tied cross term)."""

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_sample_cross_entropy(self.logits(ids), labels, **head_options_of(self))


@pytest.mark.parametrize("head", ["fused", "unfused"])
@pytest.mark.parametrize("steps", [37, 600])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_influence_through_a_tied_embedding(mode, steps, head):
    """Tied embedding and head, float32: the last sample repeats one id everywhere with its own id as target (head
    and embedding gradients aligned on one row, all its embedding gradient on one token: the cross term's rounding
    bound at its largest, flashnorm/norms/tied.py); its influence stays ≤ C(1 + 1e-3), fused head or not."""

    def build():
        torch.manual_seed(0)
        return (TinyLM if head == "fused" else UnfusedLM)(150, 6, tied=True, shift=True, vocab_block=64)

    ids, labels = batch(150, 4, steps, ignored=False)
    ids[-1], labels[-1] = 3, 3
    measured = influence(_attempts(build, mode), ((ids, labels), (ids[:-1], labels[:-1])), clip=C)
    assert measured is not None and measured > 0.5 * C
