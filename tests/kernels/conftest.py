"""Fixtures of the kernel tests: the device they run on and the forced Triton backend."""

import pytest
import torch


@pytest.fixture
def device() -> str:
    """CUDA when present (the kernels run compiled), else CPU (the kernels run under TRITON_INTERPRET=1)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels through the public dispatchers (``FLASHNORM_BACKEND=triton``)."""
    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
