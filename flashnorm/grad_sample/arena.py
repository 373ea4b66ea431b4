"""One buffer for the per-sample gradients a one-pass step keeps.

Where the planner materialises per-sample gradients (``per_sample``: small layers, or where they
take no more memory than the X and G they replace), the one-pass mode needs, per parameter θ,
the norm ‖∇_θ ℓ_b‖ and the clipped sum Σ_b c_b ∇_θ ℓ_b. Done per parameter that is four to six
small launches each — most of the CPU cost of a step on a GPT-2 sized model. The arena lays all of
them out side by side, per dtype, in one [B, N] buffer (sample b's gradients contiguous in row b):

* the layers write their per-sample gradients into views of it (``slots``) during the backward pass;
* ‖g_b‖² over all of them is one reduction of the buffer:   Σ_j A[b, j]²;
* the clipped sum of all of them is one GEMV:                 cᵀA ∈ ℝ^N,
  cast once to the parameters' dtype and handed out as views (``p.grad``).

Memory is what the separate per-sample gradients took, B·N elements.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from ..kernels import weighted_row_sum


class PerSampleArena:
    """Per-sample gradient slots of one step, one [B, N] buffer per dtype.

    Usage: :meth:`reserve` every (parameter, dtype) that will be kept, :meth:`allocate`; during the
    pass :meth:`slot` hands out the [B, *θ.shape] views and :meth:`store` records what was written;
    after it :meth:`finish`, then :meth:`norms` and :meth:`clipped_sum` read them all.
    """

    def __init__(self, batch: int, device: torch.device):
        self.batch = batch
        self.device = device
        self._layout: Dict[torch.dtype, List[Tuple[nn.Parameter, int]]] = defaultdict(list)  # dtype -> (θ, offset)
        self._size: Dict[torch.dtype, int] = defaultdict(int)
        self._buffers: Dict[torch.dtype, torch.Tensor] = {}
        self._slots: Dict[int, torch.Tensor] = {}
        self._written: set = set()

    def reserve(self, param: nn.Parameter, dtype: torch.dtype) -> None:
        """Room for θ's per-sample gradients [B, *θ.shape] in ``dtype``."""
        self._layout[dtype].append((param, self._size[dtype]))
        self._size[dtype] += param.numel()

    def allocate(self) -> None:
        """Creates the buffers and the slot views (uninitialised: every slot is written before it is read)."""
        for dtype, entries in self._layout.items():
            buffer = torch.empty(self.batch, self._size[dtype], dtype=dtype, device=self.device)
            self._buffers[dtype] = buffer
            for param, offset in entries:
                self._slots[id(param)] = buffer[:, offset : offset + param.numel()].view(self.batch, *param.shape)

    def slot(self, param: nn.Parameter) -> torch.Tensor | None:
        """θ's [B, *θ.shape] view, or ``None`` when θ has no room here."""
        return self._slots.get(id(param))

    def store(self, param: nn.Parameter, grads: torch.Tensor) -> bool:
        """Marks θ's slot written: ``grads`` is the slot itself, or is copied into it when dtype and shape
        match. ``False`` (slot left alone) otherwise: the caller keeps ``grads`` on its own."""
        slot = self._slots.get(id(param))
        if slot is None or grads.dtype != slot.dtype or grads.shape != slot.shape:
            return False
        if not _same_memory(grads, slot):
            slot.copy_(grads)
        self._written.add(id(param))
        return True

    def finish(self) -> None:
        """After the pass: zeros in every slot nobody wrote (a layer the loss did not reach)."""
        for dtype, entries in self._layout.items():
            for param, _ in entries:
                if id(param) not in self._written:
                    self._slots[id(param)].zero_()

    def norms(self) -> List[torch.Tensor]:
        """‖A_b‖ per buffer: a list of [B], accumulated in float32 (float64 for float64 buffers)."""
        return [
            torch.linalg.vector_norm(buffer, dim=1, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            for dtype, buffer in self._buffers.items()
        ]

    def clipped_sum(self, coef: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        """Σ_b c_b A[b] for every reserved θ, as views of one flat tensor per (buffer, θ dtype).

        One :func:`~flashnorm.kernels.weighted_row_sum` per buffer (c and the sum in float32), cast
        to the parameters' dtype where it differs.
        """
        grads: Dict[nn.Parameter, torch.Tensor] = {}
        for dtype, buffer in self._buffers.items():
            summed = weighted_row_sum(coef, buffer)  # [N] float32 (float64 for float64 buffers)
            cast = {}
            for param, offset in self._layout[dtype]:
                if param.dtype not in cast:
                    cast[param.dtype] = summed if param.dtype == summed.dtype else summed.to(param.dtype)
                grads[param] = cast[param.dtype][offset : offset + param.numel()].view(param.shape)
        return grads


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements (same start, shape and strides)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
