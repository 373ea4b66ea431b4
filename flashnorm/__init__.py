"""FlashNorm: exact, fast DP-SGD for PyTorch — an Opacus-compatible PrivacyEngine with flash norms.

>>> from flashnorm import PrivacyEngine   # or flashnorm.privacy_engine.FlashNormPrivacyEngine
"""

from ._version import __version__
from .cuda_graphs import CudaGraphStep
from .made_private import MadePrivate, MadePrivateOpacus
from .modes import get_mode, valid_mode_names
from .privacy_engine import FlashNormPrivacyEngine, PrivacyEngine

__all__ = [
    "CudaGraphStep",
    "FlashNormPrivacyEngine",
    "MadePrivate",
    "MadePrivateOpacus",
    "PrivacyEngine",
    "get_mode",
    "valid_mode_names",
    "__version__",
]
