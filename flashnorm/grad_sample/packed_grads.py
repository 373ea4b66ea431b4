"""Packed per-sample gradients: the per-sample gradients a step keeps, side by side in a few [B, N] buffers.

Where the planner materialises per-sample gradients (``per_sample``: small layers, or where they
take no more memory than the X and G they replace), the one-pass mode needs, per parameter θ,
the norm ‖∇_θ ℓ_b‖ and the clipped sum Σ_b c_b ∇_θ ℓ_b. Done per parameter that is four to six
small launches each. Packing lays them out side by side in a few [B, N] buffers (one dtype each; sample b's gradients contiguous in row b):

* the layers write their per-sample gradients into views of them (``slots``) during the backward pass;
* ‖g_b‖² over all of a buffer is one reduction:   Σ_j A[b, j]²;
* the clipped sum of all of a buffer is one GEMV:  cᵀA ∈ ℝ^N in float32
  (`weighted_row_sum`), handed out as views (``p.grad``).

Buffers hold about ``CHUNK_BYTES`` each and are laid out in the order the backward pass reaches the
layers; each is allocated when its first slot is written, so the memory grows as the pass frees
activations, as separate per-sample gradients would, rather than all at once before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..kernels import weighted_row_sum
from ..kernels.accumulation import accumulation_dtype, accumulation_dtype_of

#: A buffer is closed once it holds this many bytes (a larger parameter gets a buffer of its own).
CHUNK_BYTES = 256 << 20


@dataclass(eq=False)
class _Chunk:
    dtype: torch.dtype
    params: List[nn.Parameter] = field(default_factory=list)  # in buffer order
    size: int = 0
    buffer: Optional[torch.Tensor] = None


class PackedPerSampleGrads:
    """Per-sample gradient slots of one step, in [B, N] buffers of one dtype each.

    Usage: `reserve` every (parameter, dtype) that will be kept, in the order the backward pass
    writes them; during the pass `slot` hands out the [B, *θ.shape] views (allocating their
    buffer on first use) and `store` records what was written; after it `finish`, then
    `norms` and `clipped_sum` read them all.
    """

    def __init__(self, batch: int, device: torch.device):
        self.batch = batch
        self.device = device
        self._chunks: List[_Chunk] = []
        self._open: Dict[torch.dtype, _Chunk] = {}
        self._where: Dict[int, _Chunk] = {}
        self._slots: Dict[int, torch.Tensor] = {}
        self._written: set = set()

    def reserve(self, param: nn.Parameter, dtype: torch.dtype) -> None:
        """Room for θ's per-sample gradients [B, *θ.shape] in ``dtype``."""
        chunk = self._open.get(dtype)
        if chunk is None or (chunk.size and self.batch * (chunk.size + param.numel()) * dtype.itemsize > CHUNK_BYTES):
            chunk = self._open[dtype] = _Chunk(dtype)
            self._chunks.append(chunk)
        self._where[id(param)] = chunk
        chunk.params.append(param)
        chunk.size += param.numel()

    def slot(self, param: nn.Parameter) -> Optional[torch.Tensor]:
        """θ's [B, *θ.shape] view (uninitialised until written), or ``None`` when θ has no room here."""
        view = self._slots.get(id(param))
        if view is None and id(param) in self._where:
            chunk = self._where[id(param)]
            chunk.buffer = torch.empty(self.batch, chunk.size, dtype=chunk.dtype, device=self.device)
            for p, part in zip(chunk.params, chunk.buffer.split([p.numel() for p in chunk.params], dim=1)):
                self._slots[id(p)] = part.view(self.batch, *p.shape)
            view = self._slots[id(param)]
        return view

    def store(self, param: nn.Parameter, grads: torch.Tensor) -> bool:
        """Marks θ's slot written: ``grads`` is the slot itself, or is copied into it when dtype and shape
        match. ``False`` (slot left alone) otherwise: the caller keeps ``grads`` on its own."""
        slot = self.slot(param)
        if grads is slot:  # written in place (the rules return the ``out`` they were given)
            self._written.add(id(param))
            return True
        if slot is None or grads.dtype != slot.dtype or grads.shape != slot.shape:
            return False
        if not _same_memory(grads, slot):
            slot.copy_(grads)
        self._written.add(id(param))
        return True

    def finish(self) -> None:
        """After the pass: zeros in every slot of an allocated buffer that nobody wrote (a layer the loss
        did not reach; buffers never allocated hold nothing and give nothing)."""
        for chunk in self._chunks:
            if chunk.buffer is not None:
                for param in chunk.params:
                    if id(param) not in self._written:
                        self._slots[id(param)].zero_()

    def norms(self) -> List[torch.Tensor]:
        """‖A_b‖ per allocated buffer: a list of [B], accumulated in float32 (float64 for float64 buffers)."""
        return [
            torch.linalg.vector_norm(c.buffer, dim=1, dtype=accumulation_dtype(c.buffer))
            for c in self._chunks
            if c.buffer is not None
        ]

    def norms_by_param(self) -> Dict[nn.Parameter, torch.Tensor]:
        """‖A_b‖ of each parameter's slot in an allocated buffer: {θ: [B]} (one reduction per parameter, on request:
        Opacus's per-parameter norms)."""
        return {
            p: torch.linalg.vector_norm(self._slots[id(p)].flatten(1), dim=1, dtype=accumulation_dtype(c.buffer))
            for c in self._chunks if c.buffer is not None
            for p in c.params
        }

    def clipped_sum(self, coef: torch.Tensor, backend: Optional[str] = None) -> Dict[nn.Parameter, torch.Tensor]:
        """Σ_b c_b A[b] for every θ of an allocated buffer, as views of one flat tensor per buffer.

        One `weighted_row_sum` per buffer (c and the sum in float32), cast
        to the parameters' dtype where it differs.
        """
        grads: Dict[nn.Parameter, torch.Tensor] = {}
        for chunk in self._chunks:
            if chunk.buffer is None:
                continue
            summed = weighted_row_sum(coef, chunk.buffer, backend=backend)  # [N] float32 (float64 for float64 buffers)
            sizes = [param.numel() for param in chunk.params]
            parts = {}  # per parameter dtype: the sum cast once, split into one piece per parameter
            for i, param in enumerate(chunk.params):
                if param.dtype not in parts:
                    cast = summed if param.dtype == summed.dtype else summed.to(param.dtype)
                    parts[param.dtype] = cast.split(sizes)
                grads[param] = parts[param.dtype][i].view(param.shape)
        return grads


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements (same start, shape and strides)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def plan_packed_grads(captured, batch: int, device: torch.device, method_of, vectors_only: bool):
    """Before the norm pass: a `PackedPerSampleGrads` with room for what this step keeps per sample, or
    ``None`` when nothing is.

    ``captured`` lists (layer, `LayerCapture`) in forward order. Room goes to
    the per-sample gradients of every layer whose ``method_of(layer, x, g_shape, g_dtype)`` is ``per_sample``, and
    to the vector parameters (biases) of the other layers, in float32 (float64 for float64 inputs), in the order the
    pass reaches them (last layer first). With ``vectors_only`` (a writer that back-propagates again needs the
    per-sample gradients for the norms alone) only vector parameters (at most one dimension) are packed; a matrix's
    per-sample gradients stay per layer and are freed as soon as they are counted.
    """
    packed = None
    for layer, capture in reversed(captured):
        x = capture.x
        if len(capture.xs) != 1 or layer.shared or x is None or x.shape[0] == 0 or capture.out_meta is None:
            continue  # several uses, tied or deferred inputs are counted on their own
        shape, dtype = capture.out_meta
        if method_of(layer, x, shape, dtype) == "per_sample":
            params, slot_dtype = layer.params, layer.rule.per_sample_dtype(layer.module, x.dtype, dtype)
            if vectors_only:
                params = [p for p in params if p.dim() <= 1]
        else:
            params, slot_dtype = layer.vectors, accumulation_dtype_of(x.dtype, dtype)
        if slot_dtype is None or not params:
            continue
        packed = packed or PackedPerSampleGrads(batch, device)
        for p in params:
            packed.reserve(p, slot_dtype)
    return packed
