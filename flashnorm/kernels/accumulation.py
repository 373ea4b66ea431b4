"""The package's accumulation dtype (float32, float64 for float64 inputs) and the chunk sizes that bound the
PyTorch references' temporaries (never B×d×p or B×T×T)."""

from __future__ import annotations

import torch

#: Largest temporary (in elements) a reference may allocate per chunk.
MAX_CHUNK_ELEMENTS = 1 << 22


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (so float64 oracles stay exact)."""
    return accumulation_dtype_of(*(t.dtype for t in tensors))


def accumulation_dtype_of(*dtypes: torch.dtype) -> torch.dtype:
    """`accumulation_dtype` from dtypes alone (planning, before any tensor exists)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def rows_per_chunk(row_elements: int) -> int:
    """How many rows of ``row_elements`` fit in one chunk (at least one)."""
    return max(1, MAX_CHUNK_ELEMENTS // max(1, row_elements))
