"""Clipped weight/bias gradients and per-sample gradients against float64 sums over samples."""

import pytest
import torch

from flashnorm.kernels import clipped_bias_grad, clipped_weight_grad, per_sample_weight_grads
from tests.conftest import TOLERANCES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", (1, 37))
def test_clipped_grads_match_float64(dtype, steps, device):
    if dtype == "fp16" and device == "cpu":
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
