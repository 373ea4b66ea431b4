"""GPU checks of the Gram-norm kernel (``pytest -m gpu``): the short-T shape grid against float64, TMA in the PTX."""

import pytest
import torch

from flashnorm.kernels import gram_norm_sq, operands
from flashnorm.kernels.backend import supports_tma
from flashnorm.kernels.gram_norm import gram_norm_launch
from tests.conftest import TOLERANCES
from tests.kernels.truth import assert_norms_close, norm_sq_float64

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEPS = (1, 37, 600, 1030, 4100)  # the Gram form is for short sequences: cost grows as T²
DIMS = ((64, 64), (768, 3072), (1024, 1024))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", (1, 3, 8))
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("d,p", DIMS, ids=lambda v: str(v))
def test_gram_norm_matches_float64(dtype, batch, steps, d, p, monkeypatch, set_tf32):
    monkeypatch.delenv("FLASHNORM_BACKEND", raising=False)
    set_tf32(False)
    x = torch.randn(batch, steps, d, device="cuda", dtype=DTYPES[dtype])
    g = torch.randn(batch, steps, p, device="cuda", dtype=DTYPES[dtype])
    assert_norms_close(gram_norm_sq(x, g), norm_sq_float64(x, g), TOLERANCES[dtype])


@pytest.mark.parametrize("batch,steps,d,p", [(3, 600, 768, 3072), (8, 1030, 1024, 1024)])
def test_tf32_within_tf32_tolerance(batch, steps, d, p, set_tf32):
    set_tf32(True)
    x, g = torch.randn(batch, steps, d, device="cuda"), torch.randn(batch, steps, p, device="cuda")
    assert_norms_close(gram_norm_sq(x, g), norm_sq_float64(x, g), TOLERANCES["tf32"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_tma_bulk_copies_in_ptx(dtype, monkeypatch):
    if not supports_tma(torch.device("cuda")):
        pytest.skip("needs compute capability 9.x")
    x = torch.randn(2, 600, 768, device="cuda", dtype=DTYPES[dtype])
    g = torch.randn(2, 600, 3072, device="cuda", dtype=DTYPES[dtype])
    _, kernel = gram_norm_launch(x, g)  # 2·600·768·3072 < TMA_MIN_WORK (tf32 off): pointer loads
    assert "cp.async.bulk.tensor" not in kernel.asm["ptx"]
    monkeypatch.setattr(operands, "TMA_MIN_WORK", 2 * 600 * 768 * 3072)
    _, kernel = gram_norm_launch(x, g)
    assert "cp.async.bulk.tensor" in kernel.asm["ptx"]
