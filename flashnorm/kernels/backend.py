"""Backend choice for the norm kernels: Triton on CUDA, PyTorch elsewhere.

``FLASHNORM_BACKEND=triton|torch`` forces one. It is read at every call, so tests can flip it.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "torch")


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive ints (host-side launch arithmetic: ``triton.cdiv`` costs a JIT-function call)."""
    return -(-a // b)


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


def forced_backend() -> str:
    """``FLASHNORM_BACKEND`` (``"triton"``, ``"torch"``), or ``""`` when unset.

    Raises:
        ValueError: an unknown value.
    """
    forced = os.environ.get("FLASHNORM_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"FLASHNORM_BACKEND={forced!r} is not one of {', '.join(BACKENDS)} (or unset).")
    return forced


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernel should run for these inputs.

    Raises:
        ValueError: ``FLASHNORM_BACKEND`` holds an unknown value.
        RuntimeError: Triton is forced but cannot run on these tensors.
    """
    forced = forced_backend()
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


class _TritonStub:
    """Stands in for ``triton`` when it does not import: kernels stay plain functions, never launched."""

    @staticmethod
    def jit(fn=None, **_options):
        return fn if fn is not None else (lambda f: f)


@functools.lru_cache(maxsize=None)
def _device_properties(index: int):
    return torch.cuda.get_device_properties(index)


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return 4
    return _device_properties(device.index if device.index is not None else torch.cuda.current_device()).multi_processor_count


def supports_tma(device: torch.device) -> bool:
    """Tensor-memory-accelerator loads through Triton tensor descriptors: compute capability 9.x, not interpreted."""
    if device.type != "cuda" or interpreter_enabled():
        return False
    props = _device_properties(device.index if device.index is not None else torch.cuda.current_device())
    return props.major == 9


def tf32_enabled() -> bool:
    """Whether float32 dots may use tf32: follows ``torch.backends.cuda.matmul.allow_tf32`` like ``torch.matmul``."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dispatch(triton_fn, reference_fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``triton_fn(x, g)`` when :func:`use_triton` says so and no input is float64, else ``reference_fn(x, g)``.

    float64 always takes the reference, which stays in float64 (the oracle tests rely on it).
    """
    if use_triton(x, g) and torch.float64 not in (x.dtype, g.dtype):
        return triton_fn(x, g)
    return reference_fn(x, g)
