"""Gram norms ⟨X_bX_bᵀ, G_bG_bᵀ⟩ (Triton kernel and PyTorch reference) against a float64 truth of ‖G_bᵀX_b‖²."""

import pytest
import torch

from flashnorm.kernels import gram_norm_sq, gram_norm_sq_reference
from flashnorm.kernels.gram_norm import GramConfig, gram_norm_sq_triton
from tests.conftest import TOLERANCES
from tests.kernels import truth
from tests.kernels.truth import assert_norms_close, norm_sq_float64, random_pair, skip_without_tma

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
STEPS = (1, 37, 600, 1030)
D, P = 72, 40  # not multiples of the 64-wide K slices
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("batch", (0, 1, 3))
def test_triton_matches_float64(dtype, steps, batch, device, triton_backend):
    truth.assert_matches_float64(gram_norm_sq, batch, steps, D, P, DTYPES[dtype], device, TOLERANCES[dtype])


@pytest.mark.parametrize("use_tma,d,p", [(False, 23, 9), (True, 72, 40)], ids=["pointers-odd", "tma-aligned"])
@pytest.mark.parametrize("steps", (1, 37, 600))
def test_every_path_is_exact(use_tma, d, p, steps, device):
    """Many block pairs (32-step blocks: 19 per side at T=600, 190 pairs) through both load paths."""
    skip_without_tma(use_tma, device)
    x, g = random_pair(3, steps, d, p, torch.float32, device)
    out = gram_norm_sq_triton(x, g, config=GramConfig(block_t=32, block_k=32, num_warps=4, num_stages=1), use_tma=use_tma)
    assert_norms_close(out, norm_sq_float64(x, g), TOLERANCES["fp32"])


@pytest.mark.parametrize("use_tma", (False, True), ids=["pointers", "tma"])
def test_rows_past_t_contribute_nothing(use_tma, device):
    """A NaN sample next door and NaN memory past the last row leave the other samples exact."""
    skip_without_tma(use_tma, device)
    x, g = truth.nan_bordered_pair(3, 37, 72, 40, device)
    g[1, 30] = float("nan")
    out = gram_norm_sq_triton(x, g, config=GramConfig(block_t=32, block_k=32, num_warps=4, num_stages=1), use_tma=use_tma)
    assert torch.isnan(out[1])
    keep = torch.tensor([0, 2], device=device)
    assert_norms_close(out[keep], norm_sq_float64(x[keep], g[keep]), TOLERANCES["fp32"])


@pytest.mark.parametrize("steps", (1, 37, 600))
def test_tf32_is_unbiased(steps, device, triton_backend, set_tf32):
    """With allow_tf32 the inputs are rounded to nearest tf32 first (the tensor cores would truncate)."""
    set_tf32(True)
    x, g = random_pair(3, steps, D, P, torch.float32, device)
    assert_norms_close(gram_norm_sq(x, g), norm_sq_float64(x, g), TOLERANCES["tf32"])


def test_float64_takes_the_float64_reference(device, triton_backend):
    truth.assert_float64_takes_the_float64_reference(gram_norm_sq, D, P, device)


@pytest.mark.parametrize("dtype", ("fp32", "fp64"))
@pytest.mark.parametrize("steps", STEPS)
def test_reference_matches_float64(dtype, steps):
    truth.assert_reference_matches_float64(gram_norm_sq_reference, dtype, steps, D, P, TOLERANCES["fp32"])
