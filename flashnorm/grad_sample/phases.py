"""Named ranges of a clipping step, for profilers and benchmarks: what each phase cost.

Each phase of a step opens a ``torch.profiler.record_function`` range named here while a profiler records (and
nothing, at the cost of one flag read, otherwise). ``benchmarks/overhead.py`` splits a step's CPU time by these
ranges; ``tests/grad_sample/test_phases.py`` fails if one it expects is gone.
"""

from __future__ import annotations

import contextlib

import torch

#: The ranges, outermost first: the clipping workflow (its own bookkeeping), the loss checks, the norm pass (the
#: autograd pass to the gradient taps), the per-layer hooks inside it and the forward, the norm kernels a layer's
#: count launches, the clipping coefficients, the writer, and the one-sample shortcut.
CLIPPED_BACKWARD = "flashnorm.clipped_backward"
CHECKS = "flashnorm.checks"
NORM_PASS = "flashnorm.norm_pass"
FORWARD_HOOK = "flashnorm.forward_hook"
BACKWARD_HOOK = "flashnorm.backward_hook"
NORMS = "flashnorm.norms"
COEFFICIENTS = "flashnorm.coefficients"
WRITE = "flashnorm.write"
SINGLE_SAMPLE = "flashnorm.single_sample"

PHASES = (CLIPPED_BACKWARD, CHECKS, NORM_PASS, FORWARD_HOOK, BACKWARD_HOOK, NORMS, COEFFICIENTS, WRITE, SINGLE_SAMPLE)

_NO_RANGE = contextlib.nullcontext()
_autograd_profiler = torch.autograd.profiler


def recording() -> bool:
    """Whether a profiler records now (the per-layer hooks test this before opening a range)."""
    return _autograd_profiler._is_profiler_enabled


def phase(name: str):
    """A ``record_function`` range named ``name`` while the autograd profiler is on, else a no-op context."""
    if _autograd_profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return _NO_RANGE
