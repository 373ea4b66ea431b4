"""Which gradients the clipping workflow wrote: the DP optimizer steps only on those.

After a clipping step every trainable parameter carries a record of the gradient tensor the workflow left in
``p.grad`` (a weak reference and its version counter) and how many clipped backward passes it sums. A gradient
written or modified any other way (a plain ``loss.backward()``, an in-place edit, a gradient already used by a
step) no longer matches its record, and `DPOptimizerFastGradientClipping` refuses it.
"""

from __future__ import annotations

import weakref
from typing import Iterable, List, Optional, Tuple

import torch

_RECORD = "_flashnorm_clipped_grad"


def mark_clipped(params: Iterable[torch.Tensor], iterations: int) -> None:
    """Records each ``p.grad`` as the clipped sum of ``iterations`` clipped backward passes: (weak reference,
    version counter, iterations)."""
    for p in params:
        grad = p.grad
        if grad is not None:
            setattr(p, _RECORD, (weakref.ref(grad), grad._version, iterations))


def clipped_iterations(p: torch.Tensor) -> Optional[int]:
    """How many clipped backward passes ``p.grad`` sums, or ``None`` when the workflow did not write it as it is
    now (no record, another tensor, modified in place since, or already used by an optimizer step)."""
    record, grad = getattr(p, _RECORD, None), p.grad
    if record is None or grad is None or record[0]() is not grad or grad._version != record[1]:
        return None
    return None if hasattr(grad, "_processed") else record[2]


def take_pending_clipped_sum(params: List[torch.Tensor]) -> Tuple[Optional[list], int]:
    """``(gradients, k)`` when every ``p.grad`` is a clipped sum of k earlier clipping steps still waiting for its
    optimizer step (taken out of ``p.grad``: gradient accumulation), else ``(None, 0)``."""
    counts = {clipped_iterations(p) for p in params if p.grad is not None}
    if len(counts) != 1 or None in counts:
        return None, 0
    prior = [p.grad for p in params]
    for p in params:
        p.grad = None
    return prior, counts.pop()
