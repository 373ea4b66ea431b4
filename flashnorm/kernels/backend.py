"""Backend choice for the norm kernels: Triton on CUDA, PyTorch elsewhere.

``FLASHNORM_BACKEND=triton|torch`` forces one. It is read at every call, so tests can flip it.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch")


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernel should run for these inputs.

    Raises:
        ValueError: ``FLASHNORM_BACKEND`` holds an unknown value.
        RuntimeError: Triton is forced but cannot run on these tensors.
    """
    forced = os.environ.get("FLASHNORM_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"FLASHNORM_BACKEND={forced!r} is not one of {', '.join(BACKENDS)} (or unset).")
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = triton_available() and (on_cuda or interpreter_enabled())
    if forced == "torch":
        return False
    if forced == "triton":
        if not runnable:
            raise RuntimeError(
                "FLASHNORM_BACKEND=triton, but Triton cannot run here: it needs CUDA tensors, "
                "or TRITON_INTERPRET=1 for CPU tensors, and the triton package."
            )
        return True
    return runnable and on_cuda
