"""Opacus's import path of the DP criterion, kept for a one-line import change: see `flashnorm.criterion`."""

from ..criterion import DPLossFastGradientClipping, DPTensorFastGradientClipping

__all__ = ["DPLossFastGradientClipping", "DPTensorFastGradientClipping"]
