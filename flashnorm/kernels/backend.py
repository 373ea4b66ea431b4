"""Backend choice for the norm kernels: Triton on CUDA, PyTorch elsewhere.

Every public kernel takes ``backend``: ``"auto"`` (Triton on CUDA where it was measured faster, the PyTorch
reference elsewhere), ``"triton"`` (forced; CPU tensors need ``TRITON_INTERPRET=1``) or ``"torch"`` (the
references). ``None`` reads ``FLASHNORM_BACKEND`` at the call (unset or empty: ``"auto"``), so callers that
resolve once with :func:`resolve_backend` and pass the result pay no environment lookup per call.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import triton_support

BACKENDS = ("auto", "triton", "torch")
#: ``TRITON_INTERPRET=1`` as read at import: Triton reads it when the kernels are defined, so later
#: changes to the environment would not change how the kernels run.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive ints (host-side launch arithmetic: ``triton.cdiv`` costs a JIT-function call)."""
    return -(-a // b)


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    return triton_support.AVAILABLE


def resolve_backend(value: Optional[str]) -> str:
    """``"auto"``, ``"triton"`` or ``"torch"`` from a ``backend`` argument; None: ``FLASHNORM_BACKEND``
    (unset or empty: ``"auto"``). Case and surrounding blanks are ignored.

    Raises:
        ValueError: an unknown value (naming ``FLASHNORM_BACKEND`` when it came from there).
    """
    if value in BACKENDS:  # the hot path: a caller passing what it resolved once
        return value
    source = "backend"
    if value is None:
        source, value = "FLASHNORM_BACKEND", os.environ.get("FLASHNORM_BACKEND", "")
        if not value:
            return "auto"
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in BACKENDS:
        unset = " (or unset)" if source != "backend" else ""
        raise ValueError(f"{source}={value!r} is not one of {', '.join(BACKENDS)}{unset}.")
    return name


def triton_choice(x: torch.Tensor, g: torch.Tensor, backend: str) -> Optional[str]:
    """How the Triton kernels apply to inputs x and g under a resolved ``backend``:

    ``"forced"`` (``"triton"``), ``"default"`` (``"auto"`` and CUDA tensors: the caller may still prefer its
    reference where that was measured faster), or ``None``: the PyTorch reference (``"torch"``, ``"auto"`` on
    other devices, or a float64 input, which the reference keeps in float64).

    Raises:
        RuntimeError: Triton is forced but cannot run on these tensors.
    """
    if backend == "torch":
        return None
    on_cuda = x.is_cuda and g.is_cuda
    runnable = triton_available() and (on_cuda or INTERPRET)
    if backend == "triton" and not runnable:
        raise RuntimeError(
            "the triton backend was asked for (backend='triton' or FLASHNORM_BACKEND=triton), but Triton cannot "
            "run here: it needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors, and the triton package."
        )
    if torch.float64 in (x.dtype, g.dtype) or not (backend == "triton" or (runnable and on_cuda)):
        return None
    return "forced" if backend == "triton" else "default"


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
    if device.type != "cuda" or INTERPRET or triton_support.TensorDescriptor is None:
        return False
    props = _device_properties(device.index if device.index is not None else torch.cuda.current_device())
    return props.major == 9


def tf32_enabled() -> bool:
    """Whether float32 dots may use tf32: follows ``torch.backends.cuda.matmul.allow_tf32`` like ``torch.matmul``."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dispatch(triton_fn, reference_fn, x: torch.Tensor, g: torch.Tensor, backend: str) -> torch.Tensor:
    """``triton_fn(x, g)`` wherever :func:`triton_choice` allows Triton under the resolved ``backend``, else
    ``reference_fn(x, g)``. float64 always takes the reference, which stays in float64 (the oracle tests rely on it).
    """
    if triton_choice(x, g, backend) is not None:
        return triton_fn(x, g)
    return reference_fn(x, g)
