"""Shared test set-up: the interpreter switch, the ``gpu`` marker, seeding, the tolerance table, the mode list and a
process group of one rank."""

import os

import torch

# Triton kernels are defined when flashnorm.kernels is imported: without CUDA, run them under the
# interpreter (it must be set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flashnorm import get_mode, valid_mode_names  # noqa: E402

#: FlashNorm's own single-device clipping modes, in the mode table's order (no alias, no delegated or FSDP mode).
CLIPPING_MODES = tuple(
    name for name in valid_mode_names()
    if get_mode(name).name == name and not get_mode(name).delegated and not get_mode(name).fsdp
)

#: Tolerances (rtol, atol) against the float64 oracle, by compute dtype.
TOLERANCES = {
    "fp64": (1e-10, 1e-12),  # float64 model against the float64 oracle: exact algebra
    "fp32": (1e-5, 1e-7),  # CPU / Triton interpreter
    "tf32": (1e-3, 1e-5),  # fp32 inputs on the GPU, where dots may use tf32
    "fp16": (1e-2, 1e-4),
    "bf16": (1e-2, 1e-4),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where the tests run: ``FLASHNORM_TEST_DEVICE`` when set, else CUDA when present (the kernels compiled),
    else CPU (the kernels under TRITON_INTERPRET=1)."""
    return torch.device(os.environ.get("FLASHNORM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def fp32_tolerance(device) -> tuple:
    """fp32 tolerance on ``device``: cuDNN convolutions use tf32 by default on the GPU."""
    return TOLERANCES["tf32" if torch.device(device).type == "cuda" else "fp32"]


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one rank (this process) for the test, destroyed after it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
