"""What a mode row builds: the grad-sample module, optimizer and criterion classes, for every parallelism.

The mode table (`flashnorm.modes`) says *what* a mode computes (passes, norm algorithm, FSDP); this
resolver maps a row and the way the module is distributed (one process, DDP or Opacus's ``DPDDP``, FSDP2) to
the three classes `FlashNormPrivacyEngine` constructs. Delegated modes
(``hooks``, ...) are Opacus's and never reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .grad_sample import (
    DDPGradSampleModule,
    DDPGradSampleModuleFastGradientClipping,
    DDPGradSampleModuleFastGradientClippingFuse,
    FlashNormGradSampleModule,
    FSDPGradSampleModule,
    FSDPGradSampleModuleFastGradientClipping,
    FSDPGradSampleModuleFastGradientClippingFuse,
    GradSampleModuleFastGradientClipping,
    GradSampleModuleFastGradientClippingFuse,
)
from .grad_sample.fsdp import check_fsdp_layout
from .modes import Mode
from .optimizers import (
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)
from .parallelism import parallelism_of
from .criterion import DPLossFastGradientClipping

#: parallelism → the grad-sample module class for a writer of its own, and the named classes of the table's writers.
_MODULE_BASES = {
    "single": FlashNormGradSampleModule,
    "dpddp": FlashNormGradSampleModule,  # DPDDP reduces nothing in the backward pass
    "ddp": DDPGradSampleModule,
    "fsdp": FSDPGradSampleModule,
}
_NAMED = [
    GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse,
    DDPGradSampleModuleFastGradientClipping, DDPGradSampleModuleFastGradientClippingFuse,
    FSDPGradSampleModuleFastGradientClipping, FSDPGradSampleModuleFastGradientClippingFuse,
]
_OPTIMIZERS = {
    "single": DPOptimizerFastGradientClipping,
    "dpddp": DistributedDPOptimizerFastGradientClipping,
    "ddp": DistributedDPOptimizerFastGradientClipping,
    "fsdp": FSDPOptimizerFastGradientClipping,
}


@dataclass(frozen=True)
class ModeClasses:
    """The classes one mode builds for one module, and its writer."""

    grad_sample_module: type
    optimizer: type
    criterion: type
    distributed: bool
    writer: type


def module_class(parallelism: str, writer: type) -> type:
    """The grad-sample module class of a parallelism whose default writer is ``writer`` (the public class names),
    else the parallelism's base class (the writer is passed to it)."""
    base = _MODULE_BASES[parallelism]
    return next((cls for cls in _NAMED if cls.__mro__[1] is base and cls.writer_class is writer), base)


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
        grad_sample_module=module_class(parallelism, mode.writer),
        optimizer=_OPTIMIZERS[parallelism],
        criterion=DPLossFastGradientClipping,
        distributed=parallelism != "single",
        writer=mode.writer,
    )
