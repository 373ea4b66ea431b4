"""Per-sample LayerNorm / RMSNorm weight and bias gradients (Triton kernel and reference) against float64.

The float64 truth is written from the definition, independent of flashnorm. On CPU the kernel runs under
TRITON_INTERPRET=1; bf16 (wrong in the interpreter) runs on the GPU only.
"""

import pytest
import torch

from flashnorm.kernels import affine_norm
from flashnorm.kernels.affine_norm import affine_norm_grads, affine_norm_grads_reference, affine_norm_grads_triton
from flashnorm.kernels.backend import multiprocessor_count
from tests.conftest import TOLERANCES

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _truth(x, g, eps, center):
    """(Σ_t g ⊙ x̂, Σ_t g) in float64, x̂ normalised row by row with the biased variance."""
    x, g = x.double(), g.double()
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
    x_hat = x / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    return (g * x_hat).sum(dim=1), g.sum(dim=1)


def _close(out, truth, x, g, dtype):
    """Sums over T of float32 products: the error scales with Σ_t |g ⊙ x̂|, not with the sum itself."""
    rtol, _ = TOLERANCES[dtype]
    scale = g.double().abs().sum(dim=1).amax().item() if g.numel() else 0.0
    assert out.dtype == torch.float32 and out.shape == truth.shape
    torch.testing.assert_close(out.double(), truth, rtol=rtol, atol=rtol * max(scale, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("batch,steps,n", [(3, 1, 20), (2, 37, 7), (4, 600, 64), (1, 1030, 33), (2, 5, 1)])
def test_triton_matches_float64(dtype, center, batch, steps, n, device):
    """Odd n (masked columns), T = 1 and T-splits (several programs add into one sample's sums)."""
    if dtype == "bf16" and device.type == "cpu":
        pytest.skip("the interpreter computes bf16 wrongly: tested on the GPU")
    x = (3 * torch.randn(batch, steps, n, device=device) + 1).to(DTYPES[dtype])
    g = torch.randn(batch, steps, n, device=device).to(DTYPES[dtype])
    w, b = affine_norm_grads_triton(x, g, eps=1e-5, center=center)
    truth_w, truth_b = _truth(x, g, 1e-5, center)
    _close(w, truth_w, x, g, dtype)
    _close(b, truth_b, x, g, dtype)


def test_writes_strided_slots_whatever_they_held(device):
    """Arena slots: [B, n] views of a wider buffer, filled with garbage; split programs must start from zero."""
    x, g = torch.randn(3, 600, 24, device=device), torch.randn(3, 600, 24, device=device)
    assert affine_norm.launch_shape(3, 600, 24, multiprocessor_count(torch.device(device)))[3] > 1, "T must be split"
    buffer = torch.full((3, 100), float("nan"), device=device)
    w_slot, b_slot = buffer[:, 10:34], buffer[:, 50:74]
    w, b = affine_norm_grads_triton(x, g, eps=1e-6, center=True, weight_out=w_slot, bias_out=b_slot)
    assert w is w_slot and b is b_slot
    truth_w, truth_b = _truth(x, g, 1e-6, True)
    _close(w_slot, truth_w, x, g, "fp32")
    _close(b_slot, truth_b, x, g, "fp32")
    assert torch.isnan(buffer[:, :10]).all() and torch.isnan(buffer[:, 34:50]).all() and torch.isnan(buffer[:, 74:]).all()


def test_without_bias_and_empty_shapes(device):
    x, g = torch.randn(2, 9, 5, device=device), torch.randn(2, 9, 5, device=device)
    w, b = affine_norm_grads_triton(x, g, eps=1e-5, center=False, with_bias=False)
    assert b is None
    _close(w, _truth(x, g, 1e-5, False)[0], x, g, "fp32")
    slot = torch.full((2, 5), 7.0, device=device)
    w, b = affine_norm_grads_triton(x[:, :0], g[:, :0], eps=1e-5, center=True, weight_out=slot)
    assert torch.count_nonzero(w) == 0 and torch.count_nonzero(b) == 0, "T = 0: zero gradients"
    w, b = affine_norm_grads_triton(x[:0], g[:0], eps=1e-5, center=True)
    assert w.shape == (0, 5) and b.shape == (0, 5)


def test_dispatcher_takes_the_kernel_on_cuda_or_when_selected(monkeypatch, device):
    """The kernel is the default on CUDA and the reference elsewhere and under FLASHNORM_BACKEND=torch (float64
    stays float64); FLASHNORM_BACKEND=triton takes the kernel for float32 outputs and rows up to MAX_N and refuses
    rows past it, which backend="auto" hands to the reference."""
    calls = []
    kernel = affine_norm.affine_norm_grads_triton
    monkeypatch.setattr(affine_norm, "affine_norm_grads_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    x, g = torch.randn(2, 4, 6, device=device), torch.randn(2, 4, 6, device=device)
    affine_norm_grads(x, g, eps=1e-5, center=True)
    assert calls == ([1] if device.type == "cuda" else [])
    calls.clear()
    monkeypatch.setenv("FLASHNORM_BACKEND", "torch")
    affine_norm_grads(x, g, eps=1e-5, center=True)
    assert calls == []
    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
    w, _ = affine_norm_grads(x.double(), g.double(), eps=1e-5, center=True)
    assert calls == [] and w.dtype == torch.float64
    affine_norm_grads(x, g, eps=1e-5, center=True)
    assert calls == [1]
    monkeypatch.setattr(affine_norm, "MAX_N", 4)
    with pytest.raises(RuntimeError, match="rows of at most MAX_N = 4 elements, got n = 6"):
        affine_norm_grads(x, g, eps=1e-5, center=True)
    assert calls == [1]
    w, _ = affine_norm_grads(x, g, eps=1e-5, center=True, backend="auto")
    assert calls == [1]
    _close(w, _truth(x, g, 1e-5, True)[0], x, g, "fp32")


def test_reference_matches_float64_and_bad_inputs_are_refused():
    x, g = torch.randn(3, 11, 8, dtype=torch.float64), torch.randn(3, 11, 8, dtype=torch.float64)
    for center in (True, False):
        w, b = affine_norm_grads_reference(x, g, eps=1e-5, center=center)
        truth_w, truth_b = _truth(x, g, 1e-5, center)
        torch.testing.assert_close(w, truth_w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, truth_b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[B, T, n\]"):
        affine_norm_grads_reference(x, g[:, :3], eps=1e-5, center=True)
    with pytest.raises(ValueError, match="float32"):
        affine_norm_grads_triton(x.float(), g.float(), eps=1e-5, center=True, weight_out=torch.empty(3, 8, dtype=torch.float64))
