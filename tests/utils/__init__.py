"""Tests of flashnorm.utils."""
