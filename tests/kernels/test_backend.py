"""FLASHNORM_BACKEND: triton | torch | unset; bad values and impossible requests fail clearly."""

import os
import subprocess
import sys

import pytest
import torch

import flashnorm.kernels.flash_norm as flash_norm_module
import flashnorm.kernels.gram_norm as gram_norm_module
from flashnorm.kernels import flash_norm_sq, gram_norm_sq

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _refuse(*_args, **_kwargs):
    raise AssertionError("the Triton kernel ran although the torch backend was asked for")


def test_torch_backend_never_runs_triton(monkeypatch, device):
    monkeypatch.setenv("FLASHNORM_BACKEND", "torch")
    monkeypatch.setattr(flash_norm_module, "flash_norm_sq_triton", _refuse)
    monkeypatch.setattr(gram_norm_module, "gram_norm_sq_triton", _refuse)
    x, g = torch.randn(2, 5, 3, device=device), torch.randn(2, 5, 4, device=device)
    torch.testing.assert_close(flash_norm_sq(x, g), gram_norm_sq(x, g))


@pytest.mark.parametrize("value", ("triton", "TRITON", " triton "))
def test_triton_backend_runs_triton(monkeypatch, device, value):
    monkeypatch.setenv("FLASHNORM_BACKEND", value)
    calls = []
    real = flash_norm_module.flash_norm_sq_triton
    monkeypatch.setattr(flash_norm_module, "flash_norm_sq_triton", lambda x, g: calls.append(1) or real(x, g))
    flash_norm_sq(torch.randn(2, 5, 3, device=device), torch.randn(2, 5, 4, device=device))
    assert calls == [1]


def test_unset_backend_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("FLASHNORM_BACKEND", raising=False)
    monkeypatch.setattr(flash_norm_module, "flash_norm_sq_triton", _refuse)
    flash_norm_sq(torch.randn(2, 5, 3), torch.randn(2, 5, 4))


def test_bad_backend_value_is_an_error(monkeypatch):
    monkeypatch.setenv("FLASHNORM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FLASHNORM_BACKEND='cuda' is not one of triton, torch"):
        flash_norm_sq(torch.randn(2, 5, 3), torch.randn(2, 5, 4))


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gram_norm_sq(torch.randn(2, 5, 3), torch.randn(2, 5, 4))


def test_package_imports_without_triton():
    """With triton unimportable the references still run, and forcing Triton says why it cannot."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import os, torch, flashnorm.kernels as k\n"
        "x, g = torch.randn(2, 5, 3), torch.randn(2, 5, 4)\n"
        "assert torch.allclose(k.flash_norm_sq(x, g), k.gram_norm_sq(x, g))\n"
        "os.environ['FLASHNORM_BACKEND'] = 'triton'\n"
        "try:\n    k.flash_norm_sq(x, g)\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    env = {**os.environ, "FLASHNORM_BACKEND": "", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: FLASHNORM_BACKEND=triton" in result.stdout


def test_a_clipping_step_reads_the_environment_once(monkeypatch):
    """Inside environment_read_once (entered by every clipping step) the values read on entry hold; outside,
    every call reads the environment again; a bad value fails on entry and leaves no snapshot behind."""
    from flashnorm.kernels import backend

    monkeypatch.setenv("FLASHNORM_BACKEND", "torch")
    with backend.environment_read_once():
        monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
        assert backend.forced_backend() == "torch"
        with backend.environment_read_once():
            assert backend.forced_backend() == "torch"
        assert backend.forced_backend() == "torch"
    assert backend.forced_backend() == "triton"
    monkeypatch.setenv("FLASHNORM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FLASHNORM_BACKEND='cuda'"), backend.environment_read_once():
        pass
    assert backend._snapshot is None
