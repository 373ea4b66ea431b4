"""Per-layer norm rules: the registry, one file per layer family, the fallback and the planner.

Importing this package registers every family.
"""

from . import conv, embedding, linear, linear_cross_entropy, normalization  # noqa: F401  (registration on import)
from .fallback import PerSampleGradFallback
from .registry import NormRule, get_norm_rule, register_norm_rule

__all__ = ["NormRule", "PerSampleGradFallback", "get_norm_rule", "register_norm_rule"]
