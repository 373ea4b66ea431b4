"""FusedLinearCrossEntropy without privacy: per-sample losses and the gradients of X, W and b against float64 autograd
through the unfused head (full logits, ``nn.functional.cross_entropy``), at odd T, vocabularies that are not
multiples of the block, ignored targets (a sample with none left), both token reductions, label smoothing, a bias;
its tiles never hold T × V elements."""

import pytest
import torch
import torch.nn as nn

import flashnorm.layers.linear_cross_entropy as head_module
from flashnorm.layers import FusedLinearCrossEntropy, fused_linear_cross_entropy
from tests.conftest import TOLERANCES
from tests.layers.head import IGNORE, per_sample_cross_entropy

# (vocabulary, rows of W per block, T, d): blocks that do not divide the vocabulary; GPT-2's 50257 at tiny d and T.
SHAPES = [(1000, 96, 1, 8), (1000, 96, 37, 8), (1000, 96, 600, 8), (1000, 300, 1030, 8), (50257, 4096, 5, 4)]
OPTIONS = [
    dict(shift=True, token_reduction="mean"),
    dict(shift=False, token_reduction="sum", label_smoothing=0.1),
    dict(shift=True, token_reduction="sum", bias=True),
    dict(shift=False, token_reduction="mean", label_smoothing=0.2, bias=True),
]
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def _case(vocab, steps, d, dtype, bias, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d, vocab, bias=bias).to(dtype)
    hidden = torch.randn(batch, steps, d, generator=gen, dtype=dtype).requires_grad_()
    target = torch.randint(0, vocab, (batch, steps), generator=gen)
    target[1, : max(1, steps // 2)] = IGNORE
    if batch > 2:
        target[2] = IGNORE  # a sample with every target ignored: ℓ = 0 and no gradient
    return linear, hidden, target


def _gradients(loss, weights, inputs):
    return torch.autograd.grad((loss * weights).sum(), inputs)


def _unfused(linear, hidden, target, options, bias, upstream, dtype):
    """(ℓ, gradients of hidden, W, b) through the unfused head (full logits) in ``dtype``."""
    ref = nn.Linear(linear.in_features, linear.out_features, bias=bias).to(dtype)
    ref.load_state_dict({k: v.to(dtype) for k, v in linear.state_dict().items()})
    x = hidden.detach().to(dtype).requires_grad_()
    loss = per_sample_cross_entropy(ref(x), target, **options)
    return loss, _gradients(loss, upstream.to(dtype), [x, ref.weight] + ([ref.bias] if bias else []))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,block,steps,d", SHAPES)
def test_matches_float64_autograd(vocab, block, steps, d, dtype, options):
    options = dict(options)
    bias = options.pop("bias", False)
    dtype = DTYPES[dtype]
    linear, hidden, target = _case(vocab, steps, d, dtype, bias)
    head = FusedLinearCrossEntropy.from_linear(linear, vocab_block=block, **options)
    loss = head(hidden, target)
    params = [hidden, linear.weight] + ([linear.bias] if bias else [])
    upstream = torch.tensor([0.7, -1.3, 2.0], dtype=loss.dtype)  # ∂/∂ℓ_b as a DP step's coefficients would be
    grads = _gradients(loss, upstream, params)

    ref_loss, ref_grads = _unfused(linear, hidden, target, options, bias, upstream, torch.float64)
    rtol, atol = TOLERANCES["fp64" if dtype == torch.float64 else "fp32"]
    assert loss.shape == (3,) and loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    assert loss[2].item() == 0.0, "a sample with every target ignored has no loss"
    if dtype == torch.float32:  # the error ratio: no worse than twice the unfused head's own float32 error
        _, plain = _unfused(linear, hidden, target, options, bias, upstream, torch.float32)
    for i, (name, got, want) in enumerate(zip(("hidden", "weight", "bias"), grads, ref_grads)):
        assert got.dtype == dtype, name
        error = (got.double() - want).abs().max().item()
        if dtype == torch.float64:
            assert error <= atol + rtol * want.abs().max().item(), f"{name}: error {error:.3e}"
        else:
            plain_error = (plain[i].double() - want).abs().max().item()
            assert error <= 2 * plain_error + atol, f"{name}: error {error:.3e}, unfused float32 {plain_error:.3e}"
    assert not grads[0][2].any(), "the ignored sample's hidden states get no gradient"


def test_two_dimensional_hidden_is_a_classification_head():
    """hidden [B, d] with target [B]: one scored row per sample (T = 1)."""
    linear, hidden, _ = _case(13, 1, 6, torch.float64, bias=True, batch=4)
    hidden = hidden[:, 0].detach().requires_grad_()
    target = torch.tensor([0, 12, IGNORE, 5])
    loss = fused_linear_cross_entropy(hidden, linear.weight, target, linear.bias, token_reduction="sum")
    expected = nn.functional.cross_entropy(linear(hidden), target, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss.sum(), [hidden, linear.weight, linear.bias])
    want = torch.autograd.grad(expected.sum(), [hidden, linear.weight, linear.bias])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_logit_losses_are_the_heads_losses_from_the_linears_logits(options):
    """``head.logit_losses(linear(hidden), target)`` (the unfused path): the losses of ``head(hidden, target)`` and
    of float64 autograd through the full logits, and the same gradients of X, W and b (float64)."""
    options = dict(options)
    bias = options.pop("bias", False)
    linear, hidden, target = _case(1000, 37, 8, torch.float64, bias)
    head = FusedLinearCrossEntropy.from_linear(linear, vocab_block=96, **options)
    params = [hidden, linear.weight] + ([linear.bias] if bias else [])
    upstream = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    loss = head.logit_losses(linear(hidden), target)
    fused = head(hidden, target)
    ref_loss, ref_grads = _unfused(linear, hidden, target, options, bias, upstream, torch.float64)
    rtol, atol = TOLERANCES["fp64"]
    torch.testing.assert_close(loss, fused, rtol=rtol, atol=atol)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for got, fused_grad, want in zip(_gradients(loss, upstream, params), _gradients(fused, upstream, params),
                                     ref_grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        torch.testing.assert_close(got, fused_grad, rtol=rtol, atol=atol)
    with pytest.raises(ValueError, match="outside \\[0, 1000\\)"):
        head.logit_losses(linear(hidden), target.masked_fill(target == IGNORE, 1000))


def test_tiles_never_hold_steps_by_vocab(monkeypatch):
    """Every logit-gradient tile the passes form is far smaller than T × V: at most twice the hidden states
    (2·B·T·d elements, the memory budget here) or one sample's T rows of the narrowest block."""
    shapes = []
    original = head_module.logit_grad_block

    def recording(*args, **kwargs):
        g = original(*args, **kwargs)
        shapes.append(g.numel())
        return g

    monkeypatch.setattr(head_module, "logit_grad_block", recording)
    monkeypatch.setattr(head_module, "MAX_CHUNK_ELEMENTS", 1 << 12)
    vocab, steps, d = 50257, 600, 8
    linear, hidden, target = _case(vocab, steps, d, torch.float32, bias=False, batch=2)
    loss = FusedLinearCrossEntropy.from_linear(linear, shift=True)(hidden, target)
    loss.sum().backward()
    budget = max(2 * 2 * steps * d, steps * head_module.BLOCK_MULTIPLE)
    assert shapes and max(shapes) <= budget < steps * vocab // 100


def test_autocast_computes_in_its_dtype():
    """Under CPU autocast (bfloat16) the head computes with bf16 X and W, as autocast's linear would: its losses
    equal the float64 ones of the bf16-rounded operands; the weight's gradient reaches the float32 Parameter."""
    linear, hidden, target = _case(50, 9, 8, torch.float32, bias=True)
    head = FusedLinearCrossEntropy.from_linear(linear, token_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(hidden, target)
    loss.sum().backward()
    rounded = [t.detach().to(torch.bfloat16).double() for t in (hidden, linear.weight, linear.bias)]
    expected = per_sample_cross_entropy(nn.functional.linear(*rounded), target, token_reduction="sum")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert linear.weight.grad.dtype == torch.float32 and linear.weight.grad.abs().sum() > 0


def test_refusals():
    linear = nn.Linear(4, 10)
    hidden = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        FusedLinearCrossEntropy.from_linear(linear)(hidden, torch.tensor([[0, 1, 10], [0, 1, 2]]))
    with pytest.raises(ValueError, match="token_reduction"):
        FusedLinearCrossEntropy.from_linear(linear, token_reduction="none")
    with pytest.raises(ValueError, match="shift=True needs sequences"):
        FusedLinearCrossEntropy.from_linear(linear, shift=True)(hidden[:, 0], torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="one dtype"):
        FusedLinearCrossEntropy.from_linear(linear)(hidden.double(), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="expected hidden"):
        FusedLinearCrossEntropy.from_linear(linear)(hidden, torch.zeros(2, 4, dtype=torch.long))
