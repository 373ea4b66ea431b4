"""Triton, when it imports: every kernel module takes ``triton``, ``tl`` and ``TensorDescriptor`` from here.

Without the ``triton`` package flashnorm still imports: ``triton`` is then a stub whose ``jit`` leaves the kernels
plain, never-launched functions, ``tl`` is ``None``, and the dispatchers take the PyTorch references
(`triton_available` reads `AVAILABLE`). ``TensorDescriptor`` is ``None`` too
where Triton has no tensor descriptors; TMA loads are then never chosen (`supports_tma`).
"""

from __future__ import annotations


class _TritonStub:
    """Stands in for ``triton`` when it does not import: kernels stay plain functions, never launched."""

    @staticmethod
    def jit(fn=None, **_options):
        return fn if fn is not None else (lambda f: f)


try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    triton, tl, AVAILABLE = _TritonStub, None, False

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no Triton, or one without tensor descriptors: the kernels then read through pointers
    TensorDescriptor = None

__all__ = ["AVAILABLE", "TensorDescriptor", "tl", "triton"]
