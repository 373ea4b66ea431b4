"""GPU checks of the flash-norm kernel (``pytest -m gpu``): the full shape grid against float64, TMA in the PTX.

Each case is the first call of the kernel at its shape (no autotuning: configs are chosen by
`flashnorm.kernels.flash_norm.flash_norm_config`, so nothing is tuned before a call).
"""

import pytest
import torch

from flashnorm.kernels import flash_norm_sq, operands
from flashnorm.kernels.backend import supports_tma
from flashnorm.kernels.flash_norm import flash_norm_launch, flash_norm_sq_triton
from tests.conftest import TOLERANCES
from tests.kernels.truth import assert_norms_close, norm_sq_float64

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BATCHES = (1, 3, 8)
STEPS = (1, 37, 600, 1030, 4100, 8196, 65536)
DIMS = ((64, 64), (768, 3072), (1024, 1024), (4096, 4096), (4096, 11008))
MAX_BYTES = 40e9  # inputs plus the float64 truth's temporaries


def footprint(batch, steps, d, p, dtype):
    """Bytes a case holds on the GPU: inputs, float64 W_b (twice, for the einsum result) and a 1 GiB chunk."""
    return batch * steps * (d + p) * dtype.itemsize + 2 * 8 * d * p + (1 << 30)


def cases():
    for name, dtype in DTYPES.items():
        for batch in BATCHES:
            for steps in STEPS:
                for d, p in DIMS:
                    marks = [pytest.mark.skip(reason="over 40 GB")] if footprint(batch, steps, d, p, dtype) > MAX_BYTES else []
                    yield pytest.param(name, batch, steps, d, p, marks=marks, id=f"{name}-B{batch}-T{steps}-{d}x{p}")


@pytest.fixture
def cuda_default_backend(monkeypatch, set_tf32):
    monkeypatch.delenv("FLASHNORM_BACKEND", raising=False)
    set_tf32(False)


@pytest.mark.parametrize("dtype,batch,steps,d,p", list(cases()))
def test_flash_norm_matches_float64(dtype, batch, steps, d, p, cuda_default_backend):
    x = torch.randn(batch, steps, d, device="cuda", dtype=DTYPES[dtype])
    g = torch.randn(batch, steps, p, device="cuda", dtype=DTYPES[dtype])
    out = flash_norm_sq(x, g)  # CUDA tensors, no FLASHNORM_BACKEND: the Triton kernel
    assert_norms_close(out, norm_sq_float64(x, g), TOLERANCES[dtype])


@pytest.mark.parametrize("k_major", (None, False), ids=["default", "mn-major"])
@pytest.mark.parametrize("batch,steps,d,p", [(3, 4100, 1024, 1024), (1, 65536, 4096, 4096), (8, 1030, 768, 3072), (3, 37, 64, 64)])
def test_tf32_dots_within_tf32_tolerance(batch, steps, d, p, k_major, set_tf32):
    """float32 inputs with ``allow_tf32`` on take tf32 dots, like torch.matmul, on operands rounded to nearest."""
    set_tf32(True)
    x, g = torch.randn(batch, steps, d, device="cuda"), torch.randn(batch, steps, p, device="cuda")
    assert_norms_close(flash_norm_sq_triton(x, g, k_major=k_major), norm_sq_float64(x, g), TOLERANCES["tf32"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_call_at_a_new_shape_is_exact(dtype, cuda_default_backend):
    x = torch.randn(2, 333, 200, device="cuda", dtype=DTYPES[dtype])
    g = torch.randn(2, 333, 136, device="cuda", dtype=DTYPES[dtype])
    truth = norm_sq_float64(x, g)
    first = flash_norm_sq(x, g)
    assert_norms_close(first, truth, TOLERANCES[dtype])
    assert_norms_close(flash_norm_sq(x, g), truth, TOLERANCES[dtype])


@pytest.mark.parametrize("use_tma", (False, True), ids=["pointers", "tma"])
@pytest.mark.parametrize("d,p", [(1024, 1024), (23, 9), (4096, 136)])
def test_pointer_fallback_and_tma_agree(use_tma, d, p):
    if use_tma and not supports_tma(torch.device("cuda")):
        pytest.skip("tensor descriptors need compute capability 9.x")  # (unaligned rows: through aligned copies)
    x = torch.randn(3, 1030, d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(3, 1030, p, device="cuda", dtype=torch.bfloat16)
    assert_norms_close(flash_norm_sq_triton(x, g, use_tma=use_tma), norm_sq_float64(x, g), TOLERANCES["bf16"])


@pytest.mark.parametrize("dtype,tf32", [("fp32", False), ("fp32", True), ("bf16", False), ("fp16", False)])
def test_tma_bulk_copies_in_ptx(dtype, tf32, set_tf32, monkeypatch):
    """On compute capability 9.x the default launch loads tiles with ``cp.async.bulk.tensor`` from ``TMA_MIN_WORK``
    (rows·d·p) on, and with tf32 (K-major path) from ``TMA_MIN_ROWS_TF32`` rows; smaller launches take pointer loads."""
    if not supports_tma(torch.device("cuda")):
        pytest.skip("needs compute capability 9.x")
    set_tf32(tf32)
    x = torch.randn(1, 4100, 1024, device="cuda", dtype=DTYPES[dtype])
    g = torch.randn(1, 4100, 1024, device="cuda", dtype=DTYPES[dtype])
    work = 4100 * 1024 * 1024
    assert work < operands.TMA_MIN_WORK
    _, kernel = flash_norm_launch(x, g)
    assert ("cp.async.bulk.tensor" in kernel.asm["ptx"]) == tf32, "below TMA_MIN_WORK only the tf32 path takes descriptors"
    monkeypatch.setattr(operands, "TMA_MIN_WORK", work)
    _, kernel = flash_norm_launch(x, g)
    assert "cp.async.bulk.tensor" in kernel.asm["ptx"]


@pytest.mark.parametrize("block_bytes", (None, 2 * 1030 * 2 * 4096), ids=["default-blocks", "4096-column-blocks"])
@pytest.mark.parametrize("dtype", ("bf16", "fp16"))
def test_unaligned_vocabulary_reads_aligned_copies_through_descriptors(dtype, block_bytes, monkeypatch, cuda_default_backend):
    """GPT-2's LM head (p = 50257: rows of 100514 bytes, not 16-byte aligned): the default launch copies G into
    aligned buffers a block of columns at a time and loads tiles with ``cp.async.bulk.tensor``; exact against
    float64."""
    if not supports_tma(torch.device("cuda")):
        pytest.skip("needs compute capability 9.x")
    if block_bytes is not None:
        monkeypatch.setattr(operands, "ALIGNED_COPY_BYTES", block_bytes)
    x = torch.randn(2, 1030, 768, device="cuda", dtype=DTYPES[dtype])
    g = torch.randn(2, 1030, 50257, device="cuda", dtype=DTYPES[dtype])
    assert not operands.tma_compatible(g.view(-1, 50257)) and operands.aligned_copies_pay(x.view(-1, 768), g.view(-1, 50257))
    norm_sq, kernel = flash_norm_launch(x, g)
    assert "cp.async.bulk.tensor" in kernel.asm["ptx"]
    assert_norms_close(norm_sq, norm_sq_float64(x, g), TOLERANCES[dtype])
