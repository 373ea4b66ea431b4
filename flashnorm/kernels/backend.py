"""Backend choice for the norm kernels: Triton on CUDA, PyTorch elsewhere.

Every public kernel takes ``backend``: ``"auto"`` (Triton on CUDA where it applies and is faster, the PyTorch
reference elsewhere), ``"triton"`` (forced: Triton or an error, never the reference; CPU tensors need
``TRITON_INTERPRET=1``) or ``"torch"`` (the references); `use_triton` is the one policy every dispatcher
asks. ``None`` reads ``FLASHNORM_BACKEND`` at the call (unset or empty: ``"auto"``), so callers that
resolve once with `resolve_backend` and pass the result pay no environment lookup per call.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

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


#: Names the forced setting in errors: an argument or the environment may have asked for it.
_FORCED = "the triton backend was asked for (backend='triton' or FLASHNORM_BACKEND=triton)"
#: The fix offered when a forced Triton backend cannot run.
_FIX = "use backend='auto' (the PyTorch reference then serves these inputs) or backend='torch'"


def use_triton(
    backend: str,
    *tensors: torch.Tensor,
    name: str,
    unsupported: Optional[Callable[[], Optional[str]]] = None,
    reference_faster: bool = False,
) -> bool:
    """The kernels' one dispatch policy: True to run ``name``'s Triton kernel on ``tensors``, False for its PyTorch
    reference. Every dispatcher asks it, with the ``backend`` resolved by `resolve_backend`:

    * ``"torch"``: the reference.
    * float64 among the tensors: the reference, under every backend. The Triton kernels have no float64 path and
      the reference keeps float64 exact (the oracle tests rely on it); float64 work inside a lower-precision run
      (e.g. long-sequence Gram norms) therefore runs under a forced ``"triton"`` too.
    * ``"auto"``: Triton for CUDA tensors when the package imports, the kernel takes these inputs (``unsupported``
      gives no reason) and the reference is not faster for them; the reference otherwise.
    * ``"triton"``: Triton, or a RuntimeError saying why it cannot run and what to do instead; never the reference.

    Args:
        name: the dispatcher, named in errors.
        unsupported: called only where the answer matters: why the Triton kernel does not take these inputs
            (a shape, a layout, a CUDA-graph capture under way), or None when it does.
        reference_faster: the reference is faster for these inputs, so ``"auto"`` takes it.

    Raises:
        RuntimeError: ``"triton"`` was asked for and the kernel cannot run: no triton package, CPU tensors without
            ``TRITON_INTERPRET=1``, or the reason ``unsupported`` gives.
    """
    if backend == "torch":
        return False
    if any(t.dtype == torch.float64 for t in tensors):
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend != "triton":
        return on_cuda and not reference_faster and triton_available() and (unsupported is None or unsupported() is None)
    if not triton_available():
        raise RuntimeError(f"{_FORCED}, but the triton package does not import here; install triton, or {_FIX}.")
    if not (on_cuda or INTERPRET):
        raise RuntimeError(
            f"{_FORCED}, but {name} got tensors on {', '.join(sorted({str(t.device) for t in tensors}))}: Triton needs "
            f"CUDA tensors, or TRITON_INTERPRET=1 (set before flashnorm is imported) for CPU tensors; {_FIX}."
        )
    reason = unsupported() if unsupported is not None else None
    if reason is not None:
        raise RuntimeError(f"{_FORCED}, but the Triton kernel of {name} {reason}; {_FIX}.")
    return True


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
