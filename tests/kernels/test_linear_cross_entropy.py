"""The fused head's logit kernels (flashnorm/kernels/linear_cross_entropy.py): Triton (under TRITON_INTERPRET=1 on CPU)
and the PyTorch reference against float64 truth, at rows, vocabulary ranges and d that are not multiples of the
tiles; the gradient block repeats bit for bit wherever its tile lies; float64 takes the reference. bf16 and the
compiled kernels: test_linear_cross_entropy_gpu.py."""

import pytest
import torch

from flashnorm.kernels.linear_cross_entropy import (
    logit_grad_block,
    logit_grad_block_reference,
    logit_stats,
    logit_stats_reference,
)
from tests.conftest import TOLERANCES

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
# (rows, d, V, [v0, v1)): rows and the range are not multiples of the interpreter's 32×64 tiles, d = 72 not of 64.
CASES = [(1, 8, 150, (0, 150)), (37, 72, 150, (37, 101)), (75, 8, 300, (64, 300))]


def _inputs(rows, d, vocab, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen, dtype=dtype).to(device)
    w = torch.randn(vocab, d, generator=gen, dtype=dtype).to(device) / d**0.5
    b = torch.randn(vocab, generator=gen, dtype=dtype).to(device) if bias else None
    y = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    y[::5] = -100
    return x, w, b, y


def _logits64(x, w, b):
    z = x.double() @ w.double().T
    return z if b is None else z + b.double()


def _stats64(x, w, b, y, v0, v1):
    z = _logits64(x, w, b)[:, v0:v1]
    local = y - v0
    inside = (local >= 0) & (local < v1 - v0)
    z_y = torch.where(inside, z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0], torch.zeros_like(z[:, 0]))
    return torch.logsumexp(z, dim=1), z_y, z.sum(dim=1)


def _grad64(x, w, b, y, lse, alpha, keep, spread, r0, r1, v0, v1):
    z = _logits64(x, w, b)[r0:r1, v0:v1]
    onehot = (torch.arange(v0, v1, device=x.device)[None, :] == y[r0:r1, None]).double()
    return alpha[r0:r1, None].double() * (torch.exp(z - lse[r0:r1, None].double()) - keep * onehot - spread)


def _check(stats, want, tolerance, x, w, b, span):
    """lse and z_y to the tolerance; Σ_v z_v, a sum that may cancel, to rtol·Σ_v |z_v| (the scale of its rounding)."""
    rtol, atol = tolerance
    scale = _logits64(x, w, b)[:, span[0]:span[1]].abs().sum(dim=1).max().item()
    for got, expected, tol in zip(stats, want, (atol, atol, max(atol, rtol * scale))):
        torch.testing.assert_close(got.double().cpu(), expected.cpu(), rtol=rtol, atol=tol)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rows,d,vocab,span", CASES)
def test_stats_match_float64(rows, d, vocab, span, bias, device, triton_backend):
    x, w, b, y = _inputs(rows, d, vocab, torch.float32, device, bias)
    out = logit_stats(x, w, b, y, *span)
    assert all(t.dtype == torch.float32 and t.shape == (rows,) for t in out)
    _check(out, _stats64(x, w, b, y, *span), TOLERANCES["fp32"], x, w, b, span)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rows,d,vocab,span", CASES)
def test_grad_block_matches_float64(rows, d, vocab, span, bias, device, triton_backend):
    x, w, b, y = _inputs(rows, d, vocab, torch.float32, device, bias)
    lse = torch.logsumexp(_logits64(x, w, b), dim=1).float()
    alpha = torch.rand(rows, device=device)
    alpha[::3] = 0
    r0, r1 = rows // 3, rows
    out = logit_grad_block(x, r0, r1, w, b, *span, lse, y, alpha, 0.9, 0.1 / vocab)
    assert out.dtype == torch.float32 and out.shape == (r1 - r0, span[1] - span[0])
    want = _grad64(x, w, b, y, lse, alpha, 0.9, 0.1 / vocab, r0, r1, *span)
    rtol, atol = TOLERANCES["fp32"]
    torch.testing.assert_close(out.double().cpu(), want.cpu(), rtol=rtol, atol=atol)


def test_grad_block_repeats_bit_for_bit(device, triton_backend):
    """The norm pass and the write of a step form G for the same rows and block: the same bits."""
    x, w, b, y = _inputs(75, 72, 300, torch.float32, device)
    lse, alpha = torch.logsumexp(_logits64(x, w, b), dim=1).float(), torch.rand(75, device=device)
    part = logit_grad_block(x, 13, 51, w, b, 37, 201, lse, y, alpha, 1.0, 0.0)
    again = logit_grad_block(x, 13, 51, w, b, 37, 201, lse, y, alpha, 1.0, 0.0)
    assert torch.equal(part, again)


@pytest.mark.parametrize("rows,d,vocab,span", CASES[1:])
def test_references_match_float64(rows, d, vocab, span):
    x, w, b, y = _inputs(rows, d, vocab, torch.float32, "cpu")
    _check(logit_stats_reference(x, w, b, y, *span), _stats64(x, w, b, y, *span), TOLERANCES["fp32"], x, w, b, span)
    lse, alpha = torch.logsumexp(_logits64(x, w, b), dim=1).float(), torch.rand(rows)
    out = logit_grad_block_reference(x, 0, rows, w, b, *span, lse, y, alpha, 0.8, 0.2 / vocab)
    want = _grad64(x, w, b, y, lse, alpha, 0.8, 0.2 / vocab, 0, rows, *span)
    torch.testing.assert_close(out.double(), want, rtol=TOLERANCES["fp32"][0], atol=TOLERANCES["fp32"][1])


def test_float64_takes_the_float64_reference(device, triton_backend):
    """float64 never reaches Triton (forced or not): the reference keeps it float64."""
    x, w, b, y = _inputs(9, 8, 40, torch.float64, device)
    out = logit_stats(x, w, b, y, 0, 40)
    assert out[0].dtype == torch.float64
    _check(out, _stats64(x, w, b, y, 0, 40), TOLERANCES["fp64"], x, w, b, (0, 40))


def test_forced_triton_names_the_fix_for_cpu_tensors_without_the_interpreter(monkeypatch):
    from flashnorm.kernels import backend

    monkeypatch.setattr(backend, "INTERPRET", False)
    x, w, b, y = _inputs(3, 8, 10, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="logit_stats got tensors on cpu"):
        logit_stats(x, w, b, y, 0, 10, backend="triton")
