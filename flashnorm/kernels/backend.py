"""Backend choice for the norm kernels: Triton on CUDA, PyTorch elsewhere.

``FLASHNORM_BACKEND=triton|torch`` forces one. It is read at every call, so tests can flip it — except
inside :func:`environment_read_once`, which a clipping step enters: one read of the environment serves
the step's ~100 kernel calls (each ``os.environ`` lookup costs microseconds of host time).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional, Tuple

import torch

BACKENDS = ("triton", "torch")


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive ints (host-side launch arithmetic: ``triton.cdiv`` costs a JIT-function call)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


#: (FLASHNORM_BACKEND, TRITON_INTERPRET) as read on entering :func:`environment_read_once`, else None.
_snapshot: Optional[Tuple[str, bool]] = None


def interpreter_enabled() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton kernels run on CPU tensors)."""
    if _snapshot is not None:
        return _snapshot[1]
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str:
    """``FLASHNORM_BACKEND`` (``"triton"``, ``"torch"``), or ``""`` when unset.

    Raises:
        ValueError: an unknown value.
    """
    if _snapshot is not None:
        return _snapshot[0]
    forced = os.environ.get("FLASHNORM_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"FLASHNORM_BACKEND={forced!r} is not one of {', '.join(BACKENDS)} (or unset).")
    return forced


@contextlib.contextmanager
def environment_read_once() -> Iterator[None]:
    """Within the block, :func:`forced_backend` and :func:`interpreter_enabled` return what they read on
    entry (validated there). A module global, not a context variable: the autograd engine runs the
    backward hooks, and hence the kernel calls, on its own device threads. Nests."""
    global _snapshot
    outer = _snapshot
    if outer is None:
        _snapshot = (forced_backend(), interpreter_enabled())
    try:
        yield
    finally:
        _snapshot = outer


def triton_choice(x: torch.Tensor, g: torch.Tensor) -> Optional[str]:
    """How the Triton kernels apply to inputs x and g (``FLASHNORM_BACKEND`` read once):

    ``"forced"`` (``FLASHNORM_BACKEND=triton``), ``"default"`` (CUDA tensors, nothing forced: the caller
    may still prefer its reference where that was measured faster), or ``None``: the PyTorch reference
    (other devices, ``FLASHNORM_BACKEND=torch``, or a float64 input, which the reference keeps in float64).

    Raises:
        ValueError: ``FLASHNORM_BACKEND`` holds an unknown value.
        RuntimeError: Triton is forced but cannot run on these tensors.
    """
    forced = forced_backend()
    if forced == "torch":
        return None
    on_cuda = x.is_cuda and g.is_cuda
    runnable = triton_available() and (on_cuda or interpreter_enabled())
    if forced == "triton" and not runnable:
        raise RuntimeError(
            "FLASHNORM_BACKEND=triton, but Triton cannot run here: it needs CUDA tensors, "
            "or TRITON_INTERPRET=1 for CPU tensors, and the triton package."
        )
    if torch.float64 in (x.dtype, g.dtype) or not (forced == "triton" or (runnable and on_cuda)):
        return None
    return "forced" if forced == "triton" else "default"


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
    """``triton_fn(x, g)`` wherever :func:`triton_choice` allows Triton, else ``reference_fn(x, g)``.

    float64 always takes the reference, which stays in float64 (the oracle tests rely on it).
    """
    if triton_choice(x, g) is not None:
        return triton_fn(x, g)
    return reference_fn(x, g)
