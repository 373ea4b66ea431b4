"""What a mode row builds: the grad-sample module, optimizer and criterion classes, for every parallelism.

The mode table (:mod:`flashnorm.modes`) says *what* a mode computes (passes, norm algorithm, FSDP); this
resolver maps a row and the way the module is distributed (one process, DDP or Opacus's ``DPDDP``, FSDP2) to
the three classes :class:`~flashnorm.privacy_engine.FlashNormPrivacyEngine` constructs. Delegated modes
(``hooks``, ...) are Opacus's and never reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from .grad_sample import GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse
from .grad_sample.ddp import DDPGradSampleModuleFastGradientClipping, DDPGradSampleModuleFastGradientClippingFuse
from .grad_sample.fsdp import (
    FSDPGradSampleModuleFastGradientClipping,
    FSDPGradSampleModuleFastGradientClippingFuse,
    check_fsdp_layout,
)
from .modes import Mode
from .optimizers import (
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)
from .utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

#: (parallelism, passes) → grad-sample module class.
_GRAD_SAMPLE_MODULES = {
    ("single", 2): GradSampleModuleFastGradientClipping,
    ("single", 1): GradSampleModuleFastGradientClippingFuse,
    ("dpddp", 2): GradSampleModuleFastGradientClipping,  # DPDDP reduces nothing in the backward pass
    ("dpddp", 1): GradSampleModuleFastGradientClippingFuse,
    ("ddp", 2): DDPGradSampleModuleFastGradientClipping,
    ("ddp", 1): DDPGradSampleModuleFastGradientClippingFuse,
    ("fsdp", 2): FSDPGradSampleModuleFastGradientClipping,
    ("fsdp", 1): FSDPGradSampleModuleFastGradientClippingFuse,
}
_OPTIMIZERS = {
    "single": DPOptimizerFastGradientClipping,
    "dpddp": DistributedDPOptimizerFastGradientClipping,
    "ddp": DistributedDPOptimizerFastGradientClipping,
    "fsdp": FSDPOptimizerFastGradientClipping,
}


@dataclass(frozen=True)
class ModeClasses:
    """The classes one mode builds for one module."""

    grad_sample_module: type
    optimizer: type
    criterion: type
    distributed: bool


def parallelism_of(module: nn.Module) -> str:
    """``"fsdp"`` (FSDP2 anywhere in the module), ``"ddp"`` (PyTorch's DDP), ``"dpddp"`` (Opacus's) or ``"single"``."""
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return "fsdp"
    if isinstance(module, DPDDP):
        return "dpddp"
    if isinstance(module, DistributedDataParallel):
        return "ddp"
    return "single"


def resolve(mode: Mode, module: nn.Module) -> ModeClasses:
    """The classes ``mode`` builds for ``module`` as it is distributed.

    Raises:
        ValueError: a delegated mode; an ``_fsdp`` mode without FSDP2, or FSDP2 without an ``_fsdp`` mode.
        NotImplementedError: an FSDP2 layout FlashNorm's hooks cannot serve.
    """
    if mode.delegated:
        raise ValueError(f"grad_sample_mode={mode.name!r} is Opacus's own; FlashNorm builds nothing for it.")
    parallelism = parallelism_of(module)
    if mode.fsdp:
        check_fsdp_layout(module)
    elif parallelism == "fsdp":
        raise ValueError(
            f"The module is wrapped with FSDP2; use grad_sample_mode={mode.name + '_fsdp'!r} instead of {mode.name!r}."
        )
    return ModeClasses(
        grad_sample_module=_GRAD_SAMPLE_MODULES[parallelism, mode.passes],
        optimizer=_OPTIMIZERS[parallelism],
        criterion=DPLossFastGradientClipping,
        distributed=parallelism != "single",
    )
