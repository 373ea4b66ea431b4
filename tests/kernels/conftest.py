"""Fixtures of the kernel tests: the forced Triton backend and the tf32 switch (``device``: tests/conftest.py)."""

import pytest
import torch


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels through the public dispatchers (``FLASHNORM_BACKEND=triton``)."""
    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")


@pytest.fixture
def set_tf32():
    """set_tf32(flag) sets ``torch.backends.cuda.matmul.allow_tf32`` for the test and restores it after."""
    before = torch.backends.cuda.matmul.allow_tf32

    def set_flag(flag: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = flag

    yield set_flag
    torch.backends.cuda.matmul.allow_tf32 = before
