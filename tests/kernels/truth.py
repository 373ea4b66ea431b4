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
