"""FlashNorm's grad-sample modules: two passes (``ghost``, ``flash``) and one pass (``flash_fuse``)."""

from ..modes import Mode
from .base import FlashNormGradSampleModule
from .fuse import GradSampleModuleFastGradientClippingFuse
from .two_pass import GradSampleModuleFastGradientClipping


def gsm_class(mode: Mode):
    """The grad-sample module class of a FlashNorm mode (the table's ``passes`` decides)."""
    return GradSampleModuleFastGradientClippingFuse if mode.fused else GradSampleModuleFastGradientClipping


__all__ = [
    "FlashNormGradSampleModule",
    "GradSampleModuleFastGradientClipping",
    "GradSampleModuleFastGradientClippingFuse",
    "gsm_class",
]
