"""Tests of flashnorm/optimizers/, one file per module."""
