"""Tests of flashnorm/grad_sample/: the clipping workflow and its modes."""
