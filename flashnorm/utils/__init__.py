"""Utilities: the DP criterion of the clipping modes."""
