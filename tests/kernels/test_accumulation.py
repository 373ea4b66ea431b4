"""The accumulation dtype and the references' chunk sizes (flashnorm/kernels/accumulation.py): float32, float64 as
soon as any input is float64; rows per chunk within MAX_CHUNK_ELEMENTS; references chunked that finely stay exact."""

import pytest
import torch

from flashnorm.kernels import accumulation, flash_norm_sq_reference, weighted_row_sum_reference
from flashnorm.kernels.accumulation import MAX_CHUNK_ELEMENTS, accumulation_dtype, accumulation_dtype_of, rows_per_chunk
from tests.kernels.truth import norm_sq_float64, random_pair

LOWER = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", LOWER)
def test_float32_unless_some_input_is_float64(dtype):
    assert accumulation_dtype_of(dtype) == torch.float32
    assert accumulation_dtype_of(dtype, torch.float16) == torch.float32
    assert accumulation_dtype_of(dtype, torch.float64) == torch.float64
    assert accumulation_dtype_of(torch.float64, dtype) == torch.float64
    assert accumulation_dtype(torch.zeros(1, dtype=dtype)) == torch.float32
    assert accumulation_dtype(torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=torch.float64)) == torch.float64


def test_no_inputs_and_integer_inputs_accumulate_in_float32():
    assert accumulation_dtype() == torch.float32 and accumulation_dtype_of() == torch.float32
    assert accumulation_dtype(torch.zeros(1, dtype=torch.long)) == torch.float32


def test_rows_per_chunk_fill_the_chunk_and_take_at_least_one_row():
    assert MAX_CHUNK_ELEMENTS == 1 << 22
    assert rows_per_chunk(1) == MAX_CHUNK_ELEMENTS
    assert rows_per_chunk(1024) == MAX_CHUNK_ELEMENTS // 1024
    assert rows_per_chunk(1000) * 1000 <= MAX_CHUNK_ELEMENTS < (rows_per_chunk(1000) + 1) * 1000
    assert rows_per_chunk(MAX_CHUNK_ELEMENTS + 1) == 1, "a row larger than a chunk is a chunk of its own"
    assert rows_per_chunk(0) == MAX_CHUNK_ELEMENTS


def test_references_chunked_finely_stay_exact(monkeypatch):
    """With seven elements per chunk the references split every operand (samples, rows of W_b, columns) and still give
    the float64 truth."""
    monkeypatch.setattr(accumulation, "MAX_CHUNK_ELEMENTS", 7)
    assert rows_per_chunk(3) == 2 and rows_per_chunk(8) == 1
    x, g = random_pair(5, 9, 4, 3, torch.float64, "cpu")
    torch.testing.assert_close(flash_norm_sq_reference(x, g), norm_sq_float64(x, g), rtol=1e-12, atol=0)
    coef, a = torch.rand(3, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    want = sum(coef[b] * a[b] for b in range(3))
    torch.testing.assert_close(weighted_row_sum_reference(coef, a), want, rtol=1e-12, atol=1e-14)
