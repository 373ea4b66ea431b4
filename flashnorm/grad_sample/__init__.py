"""FlashNorm's grad-sample modules: two passes (``ghost``, ``flash``) and one pass (``flash_fuse``)."""

from .one_pass import GradSampleModuleFastGradientClippingFuse
from .two_passes import GradSampleModuleFastGradientClipping
from .workflow import FlashNormGradSampleModule

__all__ = [
    "FlashNormGradSampleModule",
    "GradSampleModuleFastGradientClipping",
    "GradSampleModuleFastGradientClippingFuse",
]
