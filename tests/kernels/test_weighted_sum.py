"""Clipped sums of stored per-sample gradients, Σ_b c_b A[b] (Triton kernel and reference), against float64.

On CPU the kernel runs under TRITON_INTERPRET=1; bf16 (wrong in the interpreter) runs on the GPU only.
"""

import pytest
import torch

from flashnorm.kernels import weighted_row_sum, weighted_row_sum_reference
from flashnorm.kernels.weighted_sum import weighted_row_sum_triton
from tests.conftest import TOLERANCES

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _truth(coef, a):
    return coef.double() @ a.double()


def _close(out, coef, a, dtype):
    rtol, _ = TOLERANCES[dtype]
    # Σ_b c_b a_bj in float32 from exact inputs: the error is relative to Σ_b |c_b a_bj|, not to the sum.
    scale = (coef.double().abs() @ a.double().abs()).amax().item() if a.numel() else 0.0
    assert out.dtype == (torch.float64 if a.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), _truth(coef, a), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,n", [(1, 1), (3, 37), (8, 20001), (0, 5), (4, 0)])
def test_triton_matches_float64(dtype, batch, n, device, triton_backend):
    if dtype == "bf16" and device.type == "cpu":
        pytest.skip("the interpreter computes bf16 wrongly: tested on the GPU")
    a = torch.randn(batch, n, device=device).to(DTYPES[dtype])
    coef = torch.rand(batch, device=device)
    out = weighted_row_sum(coef, a)
    _close(out, coef, a, dtype)
    if batch == 0:
        assert torch.count_nonzero(out) == 0


def test_strided_rows_are_read_in_place(device, triton_backend):
    """A slot of a wider buffer: rows strided, columns contiguous."""
    buffer = torch.randn(3, 100, device=device)
    a = buffer[:, 10:47]
    coef = torch.rand(3, device=device)
    _close(weighted_row_sum_triton(coef, a), coef, a, "fp32")


def test_coefficients_are_not_rounded_to_the_gradient_dtype(device, triton_backend):
    """c_b = 1 - 2⁻¹⁰ is 1.0 in bf16/fp16 arithmetic: a sum in the gradient dtype would exceed the clipped value."""
    a = torch.ones(1, 8, device=device, dtype=torch.float16)
    coef = torch.full((1,), 1 - 2**-10, device=device)
    assert torch.all(weighted_row_sum(coef, a) == coef[0])
    assert torch.all(weighted_row_sum_reference(coef, a) == coef[0])


def test_reference_float64_stays_float64():
    a, coef = torch.randn(3, 10, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    out = weighted_row_sum_reference(coef, a)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _truth(coef, a), rtol=1e-12, atol=1e-12)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"coef: \[B\] and a: \[B, N\]"):
        weighted_row_sum(torch.ones(3), torch.ones(2, 4))
