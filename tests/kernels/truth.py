"""Float64 ground truth for the kernel tests, straight from the definition ‖G_bᵀX_b‖²_F.

Deliberately independent of flashnorm: one sample and one T-chunk at a time, einsum in float64.
"""

import pytest
import torch

from flashnorm.kernels.backend import supports_tma


def norm_sq_float64(x: torch.Tensor, g: torch.Tensor, max_chunk_elements: int = 1 << 27) -> torch.Tensor:
    """‖G_bᵀX_b‖²_F in float64 for x: [B, T, d], g: [B, T, p] → [B] float64, on x's device."""
    batch, steps, d = x.shape
    p = g.shape[-1]
    out = torch.zeros(batch, dtype=torch.float64, device=x.device)
    rows = max(1, max_chunk_elements // max(1, d + p))
    for b in range(batch):
        w = torch.zeros(p, d, dtype=torch.float64, device=x.device)
        for t0 in range(0, steps, rows):
            w += torch.einsum("tp,td->pd", g[b, t0 : t0 + rows].double(), x[b, t0 : t0 + rows].double())
        out[b] = w.square().sum()
    return out


def assert_norms_close(out: torch.Tensor, truth: torch.Tensor, tolerance: tuple[float, float]) -> None:
    """out (float32) against the float64 truth at (rtol, atol); reports the worst relative error."""
    rtol, atol = tolerance
    assert out.dtype == torch.float32, out.dtype
    assert out.shape == truth.shape, (out.shape, truth.shape)
    rel = ((out.double() - truth).abs() / truth.abs().clamp_min(1e-300)).max().item() if truth.numel() else 0.0
    torch.testing.assert_close(out.double(), truth, rtol=rtol, atol=atol, msg=lambda m: f"{m}\nmax rel err {rel:.3e}")


def random_pair(batch: int, steps: int, d: int, p: int, dtype: torch.dtype, device) -> tuple:
    """x: [B, T, d] and g: [B, T, p], standard normal."""
    return (torch.randn(batch, steps, d, dtype=dtype, device=device),
            torch.randn(batch, steps, p, dtype=dtype, device=device))  # fmt: skip


def skip_without_tma(use_tma: bool, device) -> None:
    """Skips a TMA case on a CUDA device without tensor descriptors (on CPU the interpreter takes pointers)."""
    if use_tma and torch.device(device).type == "cuda" and not supports_tma(torch.device(device)):
        pytest.skip("tensor descriptors need compute capability 9.x")


def assert_default_takes_aligned_copies(monkeypatch, module, wrapper: str, run, check, device) -> None:
    """The default policy (compute capability 9.x, 16-bit, work ≥ TMA_MIN_WORK, unaligned rows) routes a launch
    through ``module.<wrapper>``, its aligned-copy path; aligned rows never are. ``run(x, g)`` launches with the
    defaults, ``check(out, x, g)`` holds the result to float64."""
    from flashnorm.kernels import operands

    taken = []
    original = getattr(module, wrapper)
    monkeypatch.setattr(module, wrapper, lambda *a: taken.append(1) or original(*a))
    monkeypatch.setattr(operands, "supports_tma", lambda device: True)
    monkeypatch.setattr(operands, "TMA_MIN_WORK", 1)
    x, g = random_pair(2, 37, 24, 9, torch.float16, device)
    check(run(x, g), x, g)
    assert taken == [1]
    x, g = random_pair(2, 37, 24, 16, torch.float16, device)
    run(x, g)
    assert taken == [1]


def assert_float64_takes_the_float64_reference(norm_sq, d: int, p: int, device) -> None:
    """``norm_sq(x, g)``, a dispatcher, on float64 inputs: a float64 result, exact to 1e-12."""
    x, g = random_pair(2, 37, d, p, torch.float64, device)
    out = norm_sq(x, g)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, norm_sq_float64(x, g), rtol=1e-12, atol=0)


def assert_reference_matches_float64(reference, dtype: str, steps: int, d: int, p: int, fp32_tolerance: tuple) -> None:
    """``reference(x, g)`` on CPU in ``dtype`` ("fp32" or "fp64"): its accumulation dtype out, against float64
    (fp64 to 1e-12, fp32 to ``fp32_tolerance``)."""
    dt = {"fp32": torch.float32, "fp64": torch.float64}[dtype]
    x, g = random_pair(3, steps, d, p, dt, "cpu")
    out = reference(x, g)
    assert out.dtype == (torch.float64 if dtype == "fp64" else torch.float32)
    rtol, atol = (1e-12, 0.0) if dtype == "fp64" else fp32_tolerance
    torch.testing.assert_close(out.double(), norm_sq_float64(x, g), rtol=rtol, atol=atol)


def nan_bordered_pair(batch: int, steps: int, d: int, p: int, device) -> tuple:
    """Standard normal x: [B, T, d] and g: [B, T, p], adjacent in one float32 storage whose 64 rows past the end
    hold NaN: a kernel reading past the last row, or into a neighbouring sample, gets NaN."""
    storage = torch.full(((batch * steps + 64) * (d + p),), float("nan"), device=device)
    x = storage[: batch * steps * d].view(batch, steps, d)
    g = storage[batch * steps * d : batch * steps * (d + p)].view(batch, steps, p)
    x.normal_(), g.normal_()
    return x, g


def assert_matches_float64(norm_sq, batch: int, steps: int, d: int, p: int, dtype: torch.dtype, device,
                           tolerance: tuple) -> None:
    """``norm_sq(x, g)`` on standard normal x: [B, T, d], g: [B, T, p] against the float64 truth."""
    x, g = random_pair(batch, steps, d, p, dtype, device)
    assert_norms_close(norm_sq(x, g), norm_sq_float64(x, g), tolerance)
