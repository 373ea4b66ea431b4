"""Whether every per-sample loss of a step is finite, read without draining the GPU.

A non-finite loss (NaN or ±inf) would spread NaN into every parameter's clipped gradient; the clipping
workflow checks the loss once, after the gradients are written, and discards them when it fails
(`reject_non_finite_step`).
`FiniteLossCheck` is public: `CudaGraphStep` reads the check recorded
in a graph after each replay.
"""

from __future__ import annotations

import threading
from typing import Dict, Tuple

import torch

NON_FINITE_LOSS = (
    "The loss, or a per-sample gradient norm, is not finite (NaN or inf) for some sample, or a norm estimate is "
    "negative beyond its rounding bound; the step's gradients were discarded and no parameter changed. Check the "
    "learning rate and the inputs, use a loss scaler under fp16, or norm_method='flash'."
)


#: Pinned one-element flags of the loss checks, one per (device, thread), never freed. The caching host
#: allocator records an event on every stream that copied into a pinned block when that block is freed; a
#: flag freed with its module (at any garbage collection) while one of those streams captures a CUDA graph
#: would leave the allocator an event recorded during capture, which it cannot query later ("CUDA error:
#: invalid argument" at some unrelated pinned allocation, e.g. the next ``.item()``).
_PINNED_FLAGS: Dict[Tuple[torch.device, int], torch.Tensor] = {}
#: One side stream per device for reading a graphed step's flag (nothing is ever queued on it before the copy).
_READ_STREAMS: Dict[torch.device, torch.cuda.Stream] = {}


def _pinned_flag(device: torch.device) -> torch.Tensor:
    key = (device, threading.get_ident())
    flag = _PINNED_FLAGS.get(key)
    if flag is None:
        flag = _PINNED_FLAGS[key] = torch.empty((), dtype=torch.bool, pin_memory=True)
    return flag


class FiniteLossCheck:
    """Whether every per-sample loss is finite, read without draining the GPU.

    On CUDA the flag is computed and copied to a pinned host flag behind the forward's kernels, and an
    event marks the copy; `result` waits for that event only — by the end of the backward's
    issue the forward has long finished, so the wait is normally nothing, where ``bool(flag)`` would
    wait for the whole backward and leave the GPU idle while the optimizer step is issued. The host
    flag is reused (a step's check is read before the next step begins).

    Under CUDA-graph capture (``capturing``) the flag stays on the device and an *external* event
    behind it becomes a node of the graph, recorded by every replay. `result`, called after a
    replay (never during capture), waits for that node, then copies the flag to the host flag on a
    side stream with nothing queued before the copy: the wait covers the forward, not the backward.
    No pinned copy is ever captured (the host allocator cannot query an event recorded in a graph).
    """

    def __init__(self, loss_per_sample: torch.Tensor, capturing: bool = False):
        flag = torch.isfinite(loss_per_sample.detach()).all()
        self._event = self._host = None
        self._read_aside = capturing
        if flag.is_cuda:
            self._host = _pinned_flag(flag.device)
            if not capturing:
                self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event(external=capturing)
            self._event.record()
        self._flag = flag

    def __deepcopy__(self, memo) -> "FiniteLossCheck":
        """The check itself: a CUDA event cannot be copied, and a copy of a wrapped model (reached through its
        hooks) shares the verdict on the step in flight."""
        return self

    def result(self) -> bool:
        if self._event is None:
            return bool(self._flag)
        self._event.synchronize()
        if self._read_aside:
            device = self._flag.device
            stream = _READ_STREAMS.get(device)
            if stream is None:
                stream = _READ_STREAMS[device] = torch.cuda.Stream(device=device)
            with torch.cuda.stream(stream):
                self._host.copy_(self._flag, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            copied.synchronize()
        return bool(self._host)
