"""FlashNorm's grad-sample modules: the clipping step (`step`), its writers (`writers`), the layers'
hooks (`hooks`) and the module classes of every mode and parallelism."""

from .ddp import DDPGradSampleModule, DDPGradSampleModuleFastGradientClipping, DDPGradSampleModuleFastGradientClippingFuse
from .fsdp import (
    FSDPGradSampleModule,
    FSDPGradSampleModuleFastGradientClipping,
    FSDPGradSampleModuleFastGradientClippingFuse,
    ReduceScatterAssembly,
)
from .module import FlashNormGradSampleModule
from .single import GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse
from .step import ClippingStep, NormRecord, StepState
from .writers import AssembleFromKept, ClippedGradientWriter, SecondBackward

__all__ = [
    "AssembleFromKept",
    "ClippedGradientWriter",
    "ClippingStep",
    "DDPGradSampleModule",
    "DDPGradSampleModuleFastGradientClipping",
    "DDPGradSampleModuleFastGradientClippingFuse",
    "FSDPGradSampleModule",
    "FSDPGradSampleModuleFastGradientClipping",
    "FSDPGradSampleModuleFastGradientClippingFuse",
    "FlashNormGradSampleModule",
    "GradSampleModuleFastGradientClipping",
    "GradSampleModuleFastGradientClippingFuse",
    "NormRecord",
    "ReduceScatterAssembly",
    "SecondBackward",
    "StepState",
]
