"""Triton or its stand-in (flashnorm/kernels/triton_support.py): with the package, the real ``triton``, ``tl`` and
``TensorDescriptor``, which every kernel module takes from here; without it (the module loaded with Triton blocked),
a ``jit`` that leaves functions as they are, ``tl`` and ``TensorDescriptor`` None, ``AVAILABLE`` False."""

import importlib
import importlib.util
import sys

import pytest

from flashnorm.kernels import backend, triton_support

KERNEL_MODULES = ("affine_norm", "clipped_grad", "flash_norm", "gram_norm", "multi_tensor", "tiles", "weighted_sum")


def test_with_triton_the_real_package():
    triton = pytest.importorskip("triton")
    assert triton_support.AVAILABLE is True and backend.triton_available()
    assert triton_support.triton is triton and triton_support.tl is importlib.import_module("triton.language")
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        TensorDescriptor = None
    assert triton_support.TensorDescriptor is TensorDescriptor
    assert sorted(triton_support.__all__) == ["AVAILABLE", "TensorDescriptor", "tl", "triton"]


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_every_kernel_module_takes_triton_from_here(name):
    module = importlib.import_module(f"flashnorm.kernels.{name}")
    assert module.triton is triton_support.triton and module.tl is triton_support.tl
    if hasattr(module, "TensorDescriptor"):
        assert module.TensorDescriptor is triton_support.TensorDescriptor


def test_operands_take_the_tensor_descriptor_from_here():
    from flashnorm.kernels import operands

    assert operands.TensorDescriptor is triton_support.TensorDescriptor


@pytest.fixture
def without_triton(monkeypatch):
    """A fresh copy of the module, loaded while ``import triton`` fails (the installed module is untouched)."""
    for name in ("triton", "triton.language", "triton.tools", "triton.tools.tensor_descriptor"):
        monkeypatch.setitem(sys.modules, name, None)
    spec = importlib.util.spec_from_file_location("triton_support_without_triton", triton_support.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_triton_a_stub_that_launches_nothing(without_triton):
    stub = without_triton
    assert stub.AVAILABLE is False and stub.tl is None and stub.TensorDescriptor is None

    def kernel(x):
        return x + 1

    assert stub.triton.jit(kernel) is kernel
    assert stub.triton.jit(do_not_specialize=["n"])(kernel) is kernel
    assert stub.triton.jit(kernel)(1) == 2, "a plain function"
