"""The backend choice: an explicit ``backend`` argument, else FLASHNORM_BACKEND, else auto; bad values and
impossible requests fail clearly, and a forced backend runs or raises, never falling back to the other."""

import os
import subprocess
import sys

import pytest
import torch

import flashnorm.kernels.backend as backend_module
import flashnorm.kernels.flash_norm as flash_norm_module
import flashnorm.kernels.gram_norm as gram_norm_module
from flashnorm.kernels import affine_norm, clipped_grad, flash_norm_sq, gram_norm_sq, multi_tensor, triton_support
from flashnorm.kernels import resolve_backend, weighted_sum

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _refuse(*_args, **_kwargs):
    raise AssertionError("the Triton kernel ran although the torch backend was asked for")


def _count(monkeypatch, module, name):
    """Replaces module.name by a wrapper that records its calls; returns the list of calls."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _pair(device):
    return torch.randn(2, 5, 3, device=device), torch.randn(2, 5, 4, device=device)


def _ones(x):
    return torch.ones(x.shape[0], device=x.device)


#: Every public dispatcher: (module, its Triton function, a call on x: [2, 5, 3], g: [2, 5, 4] with ``backend``).
MT = multi_tensor
DISPATCHERS = {
    "flash_norm_sq": (flash_norm_module, "flash_norm_sq_triton", lambda x, g, b: flash_norm_sq(x, g, backend=b)),
    "gram_norm_sq": (gram_norm_module, "gram_norm_sq_triton", lambda x, g, b: gram_norm_sq(x, g, backend=b)),
    "clipped_weight_grad": (clipped_grad, "clipped_weight_grad_fused",
                            lambda x, g, b: clipped_grad.clipped_weight_grad(x, g, _ones(x), backend=b)),
    "affine_norm_grads": (affine_norm, "affine_norm_grads_triton",
                          lambda x, g, b: affine_norm.affine_norm_grads(x, x, eps=1e-5, center=True, backend=b)),
    "weighted_row_sum": (weighted_sum, "weighted_row_sum_triton",
                         lambda x, g, b: weighted_sum.weighted_row_sum(_ones(x), x[:, 0], backend=b)),
    "squared_norm": (MT, "squared_norm_triton", lambda x, g, b: MT.squared_norm([x, g], backend=b)),
    "scale_": (MT, "scale_triton_", lambda x, g, b: MT.scale_([x, g], _ones(x)[:1], backend=b)),
    "add_then_scale_": (MT, "add_then_scale_triton_",
                        lambda x, g, b: MT.add_then_scale_([x], torch.zeros_like(x).view(-1), 2.0, backend=b)),
}

#: Per dispatcher with inputs its Triton kernel does not take: (module, its Triton function, a call on
#: x: [2, 5, 3], g: [2, 5, 4] with ``backend`` making such inputs, what the error says). The other dispatchers'
#: kernels take every shape, layout and non-float64 dtype they accept.
UNSUPPORTED = {
    "affine_norm_grads/n > MAX_N": (
        affine_norm, "affine_norm_grads_triton", "MAX_N = 2",
        lambda x, g, b: affine_norm.affine_norm_grads(x, x, eps=1e-5, center=True, backend=b),
    ),
    "affine_norm_grads/strided output": (
        affine_norm, "affine_norm_grads_triton", "float32 outputs with contiguous rows",
        lambda x, g, b: affine_norm.affine_norm_grads(x, x, eps=1e-5, center=False, with_bias=False,
                                                      weight_out=torch.empty(3, 2, device=x.device).t(), backend=b),
    ),
    "squared_norm/non-contiguous": (
        MT, "squared_norm_triton", "tensor 1", lambda x, g, b: MT.squared_norm([x, g.transpose(1, 2)], backend=b),
    ),
    "scale_/non-contiguous": (
        MT, "scale_triton_", "tensor 0", lambda x, g, b: MT.scale_([x.transpose(0, 2), g], _ones(x)[:1], backend=b),
    ),
    "add_then_scale_/non-contiguous": (
        MT, "add_then_scale_triton_", "tensor 0",
        lambda x, g, b: MT.add_then_scale_([x.transpose(1, 2)], torch.zeros_like(x).view(-1), 2.0, backend=b),
    ),
    "add_then_scale_/strided z": (
        MT, "add_then_scale_triton_", "contiguous z",
        lambda x, g, b: MT.add_then_scale_([x], torch.zeros(2 * x.numel(), device=x.device)[::2], 2.0, backend=b),
    ),
}


@pytest.mark.parametrize("name", DISPATCHERS)
def test_the_argument_beats_the_environment(name, monkeypatch, device):
    """backend="torch" under FLASHNORM_BACKEND=triton never runs Triton; backend="triton" under
    FLASHNORM_BACKEND=torch runs it once."""
    module, triton_fn, call = DISPATCHERS[name]
    x, g = _pair(device)
    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
    calls = _count(monkeypatch, module, triton_fn)
    call(x, g, "torch")
    assert calls == []
    monkeypatch.setenv("FLASHNORM_BACKEND", "torch")
    call(x, g, "triton")
    assert calls == [1]


@pytest.mark.parametrize("name", DISPATCHERS)
def test_none_reads_the_environment(name, monkeypatch, device):
    module, triton_fn, call = DISPATCHERS[name]
    x, g = _pair(device)
    calls = _count(monkeypatch, module, triton_fn)
    monkeypatch.setenv("FLASHNORM_BACKEND", "torch")
    call(x, g, None)
    assert calls == []
    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
    call(x, g, None)
    assert calls == [1]


@pytest.mark.parametrize("name", DISPATCHERS)
def test_a_bad_argument_is_an_error(name, device):
    with pytest.raises(ValueError, match="backend='cuda' is not one of auto, triton, torch"):
        DISPATCHERS[name][2](*_pair(device), "cuda")


def test_torch_backend_never_runs_triton(monkeypatch, device):
    monkeypatch.setenv("FLASHNORM_BACKEND", "torch")
    monkeypatch.setattr(flash_norm_module, "flash_norm_sq_triton", _refuse)
    monkeypatch.setattr(gram_norm_module, "gram_norm_sq_triton", _refuse)
    x, g = _pair(device)
    torch.testing.assert_close(flash_norm_sq(x, g), gram_norm_sq(x, g))


def test_resolve_backend(monkeypatch):
    """Explicit values pass (case and blanks ignored); None reads the environment, unset or empty meaning auto."""
    monkeypatch.setenv("FLASHNORM_BACKEND", "torch")
    assert [resolve_backend(v) for v in ("auto", " Triton ", "TORCH", None)] == ["auto", "triton", "torch", "torch"]
    monkeypatch.setenv("FLASHNORM_BACKEND", " TRITON ")
    assert resolve_backend(None) == "triton"
    monkeypatch.setenv("FLASHNORM_BACKEND", "")
    assert resolve_backend(None) == "auto"
    monkeypatch.delenv("FLASHNORM_BACKEND")
    assert resolve_backend(None) == "auto"
    with pytest.raises(ValueError, match="backend='' is not one of auto, triton, torch"):
        resolve_backend("")


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("FLASHNORM_BACKEND", raising=False)
    monkeypatch.setattr(flash_norm_module, "flash_norm_sq_triton", _refuse)
    flash_norm_sq(*_pair("cpu"))
    flash_norm_sq(*_pair("cpu"), backend="auto")


def test_a_bad_environment_value_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv("FLASHNORM_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"FLASHNORM_BACKEND='cuda' is not one of auto, triton, torch \(or unset\)"):
        flash_norm_sq(*_pair("cpu"))
    flash_norm_sq(*_pair("cpu"), backend="torch")  # an explicit argument never reads it


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(backend_module, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gram_norm_sq(*_pair("cpu"), backend="triton")


def test_package_imports_without_triton():
    """With triton unimportable the references still run, and forcing Triton says why it cannot."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, flashnorm.kernels as k\n"
        "x, g = torch.randn(2, 5, 3), torch.randn(2, 5, 4)\n"
        "assert torch.allclose(k.flash_norm_sq(x, g), k.gram_norm_sq(x, g))\n"
        "try:\n    k.flash_norm_sq(x, g, backend='triton')\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    env = {**os.environ, "FLASHNORM_BACKEND": "", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: the triton backend was asked for" in result.stdout


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_forced_triton_refuses_inputs_its_kernel_does_not_take(name, monkeypatch, device):
    """backend="triton" on inputs the kernel does not take raises, naming why and the fix, and runs nothing;
    backend="auto" takes the reference for them."""
    module, triton_fn, why, call = UNSUPPORTED[name]
    if "MAX_N" in name:
        monkeypatch.setattr(affine_norm, "MAX_N", 2)
    calls = _count(monkeypatch, module, triton_fn)
    with pytest.raises(RuntimeError, match="the triton backend was asked for") as error:
        call(*_pair(device), "triton")
    assert why in str(error.value) and "backend='auto'" in str(error.value) and calls == []
    call(*_pair(device), "auto")
    assert calls == []


@pytest.mark.parametrize("name", DISPATCHERS)
def test_forced_triton_without_the_package_raises(name, monkeypatch, device):
    """No triton package: backend="triton" raises for every dispatcher, backend="auto" takes the reference."""
    module, triton_fn, call = DISPATCHERS[name]
    monkeypatch.setattr(triton_support, "AVAILABLE", False)
    calls = _count(monkeypatch, module, triton_fn)
    with pytest.raises(RuntimeError, match="the triton package does not import here; install triton, or use backend"):
        call(*_pair(device), "triton")
    call(*_pair(device), "auto")
    assert calls == []


@pytest.mark.parametrize("name", DISPATCHERS)
def test_forced_triton_on_cpu_without_the_interpreter_raises(name, monkeypatch):
    """CPU tensors without TRITON_INTERPRET=1: backend="triton" raises for every dispatcher instead of running the
    reference."""
    module, triton_fn, call = DISPATCHERS[name]
    monkeypatch.setattr(backend_module, "INTERPRET", False)
    calls = _count(monkeypatch, module, triton_fn)
    with pytest.raises(RuntimeError, match=f"but {name.rstrip('_')}_? got tensors on cpu: Triton needs CUDA tensors"):
        call(*_pair("cpu"), "triton")
    assert calls == []


@pytest.mark.parametrize("name", DISPATCHERS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
def test_forced_triton_runs_triton_where_auto_may_prefer_the_reference(name, dtype, monkeypatch, device):
    """backend="triton" runs the kernel for every dtype it takes, also where "auto" takes the reference as the faster
    path (the clipped weight gradient in float32)."""
    module, triton_fn, call = DISPATCHERS[name]
    calls = _count(monkeypatch, module, triton_fn)
    x, g = (t.to(dtype) for t in _pair(device))
    call(x, g, "triton")
    assert calls == [1]
