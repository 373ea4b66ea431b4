"""Clipped weight/bias gradients and per-sample gradients against float64 sums over samples."""

import pytest
import torch

from flashnorm.kernels import clipped_bias_grad, clipped_weight_grad, per_sample_weight_grads
from tests.conftest import TOLERANCES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# The interpreter converts 0-d arrays with __index__ (numpy deprecation, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", (1, 37))
def test_clipped_grads_match_float64(dtype, steps, device):
    if dtype == "fp16" and device.type == "cpu":
        pytest.skip("half matmul on CPU is slow and not what runs in training")
    dt = DTYPES[dtype]
    x, g = torch.randn(3, steps, 24, device=device, dtype=dt), torch.randn(3, steps, 40, device=device, dtype=dt)
    coef = torch.rand(3, device=device)
    per_sample = torch.einsum("btp,btd->bpd", g.double(), x.double())
    rtol, _ = TOLERANCES[dtype]
    # Sums over samples cancel: their rounding error scales with the summands, not the sum, so atol is
    # rtol times the largest summand (rounding the coefficient or the output is relative to that).
    atol = rtol * per_sample.abs().max().item()
    want = (coef.double()[:, None, None] * per_sample).sum(0)
    torch.testing.assert_close(clipped_weight_grad(x, g, coef).double(), want, rtol=rtol, atol=atol)
    want_bias = (coef.double()[:, None] * g.double().sum(1)).sum(0)
    torch.testing.assert_close(clipped_bias_grad(g, coef).double(), want_bias, rtol=rtol, atol=atol)
    torch.testing.assert_close(per_sample_weight_grads(x, g).double(), per_sample, rtol=rtol, atol=atol)


# -- the fused Triton kernel (c ⊙ G)ᵀX: under TRITON_INTERPRET=1 on CPU, compiled on CUDA ----------------
FUSED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _clipped_float64(x, g, coef):
    """Σ_b c_b G_bᵀX_b in float64, one sample at a time, and the largest |summand| (the scale of rounding)."""
    total = torch.zeros(g.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
    largest = 0.0
    for b in range(x.shape[0]):
        term = coef[b].double() * torch.einsum("tp,td->pd", g[b].double(), x[b].double())
        total += term
        largest = max(largest, term.abs().max().item() if term.numel() else 0.0)
    return total, largest


def _assert_clipped_close(out, x, g, coef, tolerance):
    want, largest = _clipped_float64(x, g, coef)
    rtol, atol = tolerance
    assert out.dtype == torch.float32 and out.shape == want.shape, (out.dtype, out.shape)
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=max(atol, rtol * largest))


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("steps", (1, 37, 600, 1030))
@pytest.mark.parametrize("batch", (0, 1, 3))
def test_fused_clipped_weight_grad_matches_float64(dtype, steps, batch, device):
    from flashnorm.kernels.clipped_grad import clipped_weight_grad_fused

    dt = FUSED_DTYPES[dtype]
    x, g = torch.randn(batch, steps, 72, device=device, dtype=dt), torch.randn(batch, steps, 40, device=device, dtype=dt)
    coef = torch.rand(batch, device=device)
    tolerance = TOLERANCES["tf32" if dtype == "fp32" and device.type == "cuda" else dtype]
    _assert_clipped_close(clipped_weight_grad_fused(x, g, coef), x, g, coef, tolerance)


@pytest.mark.parametrize("use_tma,d,p", [(False, 23, 9), (True, 72, 40)], ids=["pointers-odd", "tma-aligned"])
@pytest.mark.parametrize("work", [(1030, 1, 3), (1030, 1, 1), (320, 4, 5), (64, 17, 2)],
                         ids=["one-program", "sample-per-program", "chunks", "small-chunks"])
def test_fused_every_path_is_exact(use_tma, d, p, work, device):
    """Pointer and descriptor loads; one store per tile or atomic adds of samples and of T chunks
    (chunks of 64 rows: the last holds a tail of 6 rows, which must not read the next sample)."""
    from flashnorm.kernels.clipped_grad import clipped_weight_grad_fused
    from flashnorm.kernels.flash_norm import FlashConfig
    from tests.kernels.truth import skip_without_tma

    skip_without_tma(use_tma, device)
    x, g = torch.randn(3, 1030, d, device=device), torch.randn(3, 1030, p, device=device)
    coef = torch.tensor([0.25, 1.0, 0.5], device=device)
    cfg = FlashConfig(block_t=32, block_p=16, block_d=32, num_warps=4, num_stages=1)
    out = clipped_weight_grad_fused(x, g, coef, config=cfg, work=work, use_tma=use_tma)
    _assert_clipped_close(out, x, g, coef, TOLERANCES["tf32" if device.type == "cuda" else "fp32"])



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ("fp32", "bf16", "fp16"))
@pytest.mark.parametrize("batch,steps,d,p", [(8, 1030, 768, 3072), (3, 4100, 1024, 1024), (1, 8196, 4096, 4096), (2, 37, 4096, 136)])
def test_fused_on_the_gpu_matches_float64(dtype, batch, steps, d, p):
    """The compiled kernel at the GPU's own configs (first call at each shape), bf16 included."""
    from flashnorm.kernels.clipped_grad import clipped_weight_grad_fused

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x, g = torch.randn(batch, steps, d, device="cuda", dtype=dt), torch.randn(batch, steps, p, device="cuda", dtype=dt)
    coef = torch.rand(batch, device="cuda")
    _assert_clipped_close(clipped_weight_grad_fused(x, g, coef), x, g, coef, TOLERANCES["tf32" if dtype == "fp32" else dtype])


def test_dispatch_never_rounds_c_times_g_to_16_bits(monkeypatch, device):
    """float64 takes the reference (float64 result); 16-bit inputs give float32 either way: the reference widens
    them, FLASHNORM_BACKEND=triton runs the fused kernel; both exact."""
    x, g, coef = torch.randn(3, 37, 72, device=device), torch.randn(3, 37, 40, device=device), torch.rand(3, device=device)
    monkeypatch.delenv("FLASHNORM_BACKEND", raising=False)
    want, largest = _clipped_float64(x, g, coef)
    by_default = clipped_weight_grad(x.double(), g.double(), coef.double())
    assert by_default.dtype == torch.float64
    torch.testing.assert_close(by_default, want, rtol=1e-12, atol=1e-12 * largest)
    x16, g16 = x.half(), g.half()
    want16, largest16 = _clipped_float64(x16, g16, coef)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FLASHNORM_BACKEND", backend)
        out = clipped_weight_grad(x16, g16, coef)
        assert out.dtype == torch.float32, backend
        torch.testing.assert_close(out.double(), want16, rtol=1e-5, atol=1e-5 * largest16)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_c_is_applied_without_16_bit_rounding_on_cancelling_terms(dtype, monkeypatch):
    """An attacker's sample: positions whose G rows nearly cancel (a, −a·(1 + 2⁻⁷), …) against equal inputs, so
    that W_b is 2⁻⁸ of the terms. Rounding c·g_t to 16 bits would err by up to 2⁻⁹ of each term, i.e. up to half
    of W_b, far past the clipping coefficient's float32 allowance γ·s_b. The applied weight and bias gradients stay
    within that allowance of c·W_b (the reference here; the fused kernel keeps c in float32 by construction)."""
    from flashnorm.norms import rounding

    monkeypatch.setenv("FLASHNORM_BACKEND", "torch")
    steps, d = 64, 8
    x = torch.ones(1, steps, d, dtype=dtype)
    rows = torch.tensor([1.0, -(1.0 + 2.0**-7)]).repeat(steps // 2)
    g = (rows[:, None] * torch.tensor([1.0, 3.0, 5.0, 7.0])).to(dtype)[None]
    exact_w = torch.einsum("btp,btd->pd", g.double(), x.double())
    exact_b = g.double().sum(dim=(0, 1))
    s = x.double().norm() * g.double().norm()
    beyond = 0
    for c in (0.3, 0.7071, 0.123, 0.999):
        coef = torch.tensor([c])
        radius = 2 * rounding.gamma(steps, 1, dtype) * c * s
        err_w = (clipped_weight_grad(x, g, coef).double() - c * exact_w).norm()
        err_b = (clipped_bias_grad(g, coef).double() - c * exact_b).norm()
        assert err_w <= radius and err_b <= radius, (c, err_w.item(), err_b.item(), radius.item())
        rounded = (g.float() * c).to(dtype).double()  # what a 16-bit scaling applies
        beyond += (torch.einsum("btp,btd->pd", rounded, x.double()) - c * exact_w).norm() > 10 * radius
    assert beyond, "the inputs must make a 16-bit scaling leave the allowance, or the test shows nothing"


@pytest.mark.gpu
def test_dispatch_on_the_gpu_takes_the_fused_kernel_for_16_bit(monkeypatch):
    """CUDA: 16-bit inputs take the fused kernel at every T (c applied in float32), float32 inputs the reference."""
    from flashnorm.kernels import clipped_grad

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("FLASHNORM_BACKEND", raising=False)
    fused = []
    original = clipped_grad.clipped_weight_grad_fused
    monkeypatch.setattr(clipped_grad, "clipped_weight_grad_fused", lambda *a, **k: fused.append(1) or original(*a, **k))
    coef = torch.rand(2, device="cuda")
    for steps, dtype, want_fused in ((4096, torch.bfloat16, True), (37, torch.bfloat16, True), (1024, torch.float16, True),
                                     (4096, torch.float32, False)):
        fused.clear()
        x, g = torch.randn(2, steps, 64, device="cuda", dtype=dtype), torch.randn(2, steps, 48, device="cuda", dtype=dtype)
        out = clipped_weight_grad(x, g, coef)
        assert bool(fused) == want_fused and out.dtype == torch.float32, (steps, dtype)
        _assert_clipped_close(out, x, g, coef, TOLERANCES["tf32" if dtype == torch.float32 else "bf16"])


@pytest.mark.parametrize("d,p", [(24, 301), (301, 24), (23, 9)], ids=["g-wider", "x-wider", "both-odd"])
@pytest.mark.parametrize("steps", (1, 37))
def test_fused_on_unaligned_rows_reads_aligned_copies(d, p, steps, device, monkeypatch):
    """Rows that are not 16-byte aligned are read through descriptors from aligned copies: the wider operand as
    G in blocks of 128 columns (the last zero-padded: its zero output rows are dropped), the narrower whole."""
    from flashnorm.kernels import clipped_grad, operands
    from flashnorm.kernels.clipped_grad import clipped_weight_grad_fused
    from tests.kernels.truth import skip_without_tma

    skip_without_tma(True, device)
    launches = []
    original = clipped_grad.launch_clipped
    monkeypatch.setattr(clipped_grad, "launch_clipped", lambda *a: launches.append(a[1].shape[1]) or original(*a))
    monkeypatch.setattr(operands, "ALIGNED_COPY_BYTES", 1)
    dt = torch.float16
    x, g = torch.randn(3, steps, d, device=device, dtype=dt), torch.randn(3, steps, p, device=device, dtype=dt)
    coef = torch.tensor([0.25, 1.0, 0.5], device=device)
    out = clipped_weight_grad_fused(x, g, coef, use_tma=True)
    assert out.is_contiguous()
    _assert_clipped_close(out, x, g, coef, TOLERANCES["fp16"])
    assert launches == ([128, 128, 48] if max(d, p) == 301 else [24])  # (23, 9): 23 plays G, padded to 24


def test_fused_default_takes_aligned_copies_where_they_pay(device, monkeypatch):
    """The default policy (compute capability 9.x, 16-bit, work ≥ TMA_MIN_WORK, unaligned rows) routes the launch
    through the aligned copies; aligned rows never are."""
    from flashnorm.kernels import clipped_grad
    from flashnorm.kernels.clipped_grad import clipped_weight_grad_fused
    from tests.kernels.truth import assert_default_takes_aligned_copies

    coef = torch.rand(2, device=device)
    assert_default_takes_aligned_copies(
        monkeypatch, clipped_grad, "clipped_on_aligned_copies", lambda x, g: clipped_weight_grad_fused(x, g, coef),
        lambda out, x, g: _assert_clipped_close(out, x, g, coef, TOLERANCES["fp16"]), device,
    )


def test_fused_rejects_bad_inputs_clearly(device):
    """A coefficient per sample, and the dtypes the kernel takes (float64 stays with the reference)."""
    from flashnorm.kernels.clipped_grad import clipped_weight_grad_fused

    x, g = torch.randn(3, 37, 72, device=device), torch.randn(3, 37, 40, device=device)
    with pytest.raises(ValueError, match=r"coef must be \[B\] = \[3\]"):
        clipped_weight_grad_fused(x, g, torch.rand(4, device=device))
    with pytest.raises(ValueError, match="same B and T"):
        clipped_weight_grad_fused(x, g[:, :36], torch.rand(3, device=device))
    with pytest.raises(TypeError, match="reference"):
        clipped_weight_grad_fused(x.double(), g.double(), torch.rand(3, device=device))


@pytest.mark.parametrize("transposed", (False, True), ids=["pd", "dp"])
def test_per_sample_weight_grads_into_a_slot(transposed, device):
    """per_sample_weight_grads writes W_b (W_bᵀ) into a strided slot of a wider buffer."""
    x, g = torch.randn(3, 37, 24, device=device), torch.randn(3, 37, 40, device=device)
    buffer = torch.full((3, 24 * 40 + 3), float("nan"), device=device)
    slot = buffer[:, 3:].view(3, *((24, 40) if transposed else (40, 24)))
    out = per_sample_weight_grads(x, g, out=slot, transposed=transposed)
    want = torch.einsum("btp,btd->bpd", g.double(), x.double())
    want = want.transpose(1, 2) if transposed else want
    assert out.data_ptr() == slot.data_ptr() and torch.isnan(buffer[:, :3]).all()
    rtol, _ = TOLERANCES["tf32" if device.type == "cuda" else "fp32"]
    torch.testing.assert_close(slot.double(), want, rtol=rtol, atol=rtol * want.abs().max().item())
