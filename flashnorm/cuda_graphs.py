"""A training step's forward, loss and clipped backward, recorded once per batch shape in a CUDA graph.

FlashNorm's clipping modes run Python for every hooked layer: a forward hook keeping X, a backward
capture of G, the norm launch, the assembly of the clipped gradient. On a GPT-2-small model with
short sequences that host work (about 20 ms per step on an H200 host) is most of the step. A CUDA
graph records every kernel the step issues; a replay issues them all with one call, so the hooks,
the planner and the launches run once per batch shape (at capture) instead of once per step.

    >>> step = CudaGraphStep(model, lambda x, y: criterion(model(x), y))
    >>> for x, y in loader:
    ...     loss = step(x, y)       # forward + DP loss + clipped backward: p.grad = Σ_b c_b ∇ℓ_b
    ...     optimizer.step()        # noise, as in eager mode
    ...     optimizer.zero_grad()

Semantics are those of ``loss = loss_fn(*batch); loss.backward()`` after ``optimizer.zero_grad()``:

* the DP loss of FlashNorm's criterion (``make_private`` with ``ghost``, ``flash``, ``flash_fuse``):
  the optimizer's gradients are reset as the eager DP ``backward()`` resets them, the clipped
  gradients are written, and a non-finite loss raises ``ValueError`` with every ``p.grad = None``
  (the graph records an event behind the loss check's flag; after the replay is issued the host
  waits for that event only, i.e. for the forward, not for the backward, and reads the flag);
* a plain loss tensor (non-private training): its gradients, which must start from ``None``
  (``zero_grad(set_to_none=True)``, the default) — a graph overwrites, it cannot accumulate.

A new batch shape (Poisson sampling changes B), or a new C (a clipping scheduler), costs ``warmup_steps`` eager steps on a side stream
(compiling and tuning the kernels: nothing may compile during capture) and one capture; every graph
draws its memory from one shared pool, and the gradients it leaves in ``p.grad`` are its own tensors,
rewritten by the next call (the returned loss is a copy). Batches with no sample, CPU batches and steps under DDP/FSDP run eagerly or are
refused. Parameters must be updated in place (every ``torch.optim`` optimizer does); an outer
``torch.autocast`` is refused unless its cache is off (enter autocast inside ``loss_fn`` instead):
its cached weight casts would be frozen into the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from opacus.grad_sample.gsm_base import AbstractGradSampleModule

from .grad_sample import FlashNormGradSampleModule, NormRecord
from .grad_sample.loss_check import FiniteLossCheck
from .grad_sample.provenance import mark_clipped
from .criterion import DPTensorFastGradientClipping


@dataclass(eq=False)
class _Captured:
    """One batch shape's graph and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    inputs: Tuple[torch.Tensor, ...]
    loss: torch.Tensor
    grads: List[Tuple[nn.Parameter, Optional[torch.Tensor]]]
    dp_module: Optional[FlashNormGradSampleModule] = None
    optimizer: Optional[object] = None
    finite_check: Optional[FiniteLossCheck] = None  # the module's loss check, recorded in the graph
    norms: Optional[NormRecord] = None  # the norms the graph computes (and their rounding bound)
    clip: Optional[float] = None  # the C the graph clips to (recorded into its kernels)


class CudaGraphStep:
    """``step(*batch)`` runs ``loss_fn(*batch).backward()`` through a CUDA graph per batch shape.

    Args:
        model: the trained module (the wrapped one from ``make_private`` for private training).
        loss_fn: ``loss_fn(*batch)`` → FlashNorm's DP loss, or a scalar loss tensor for non-private
            training; it runs the model's forward (and enters ``torch.autocast`` if wanted).
        warmup_steps: eager steps on a side stream before each capture.

    Returns (per call): the loss (detached; a DP loss reduced as ``loss_reduction`` says).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, warmup_steps: int = 2):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps}: at least one eager step must run before a capture.")
        self.model = model
        self.loss_fn = loss_fn
        self.warmup_steps = warmup_steps
        self._graphs: Dict[tuple, _Captured] = {}
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """Graphs captured so far (one per batch shape seen)."""
        return len(self._graphs)

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            raise RuntimeError("CudaGraphStep runs a training step: call it with gradients enabled.")
        if not batch or any(not isinstance(t, torch.Tensor) for t in batch):
            raise TypeError("CudaGraphStep(*batch) takes the batch's tensors as positional arguments.")
        if not all(t.is_cuda for t in batch) or any(t.numel() == 0 for t in batch):
            return self._eager(batch)  # CPU batches, and empty Poisson batches (nothing to replay)
        if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
            raise RuntimeError(
                "CudaGraphStep was called inside torch.autocast with its weight cache on: the cached casts would be "
                "frozen into the graph. Enter autocast inside loss_fn, or pass cache_enabled=False."
            )
        key = (self.model.training, *((t.shape, t.dtype, t.device) for t in batch))
        captured = self._graphs.get(key)
        if captured is not None and captured.dp_module is not None and captured.clip != captured.dp_module.max_grad_norm:
            captured = None  # C changed (a clipping scheduler): the graph computes its coefficients with the old C
        if captured is None:
            captured = self._graphs[key] = self._capture(batch)
        return self._replay(captured, batch)

    # -- eager steps -------------------------------------------------------------------------------
    def _eager(self, batch) -> torch.Tensor:
        loss = self.loss_fn(*batch)
        self._check_loss_type(loss)
        loss.backward()
        return loss.detach()

    def _check_loss_type(self, loss) -> None:
        if isinstance(loss, DPTensorFastGradientClipping):
            return
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"loss_fn returned {type(loss).__name__}: CudaGraphStep needs FlashNorm's DP loss (the criterion from "
                "make_private with a FlashNorm grad_sample_mode) or a loss tensor."
            )
        if isinstance(self.model, AbstractGradSampleModule):
            raise NotImplementedError(
                f"CudaGraphStep supports FlashNorm's clipping modes and non-private models; {type(self.model).__name__} "
                "keeps per-sample gradients in Python lists that a graph cannot replay. Use grad_sample_mode='flash_fuse'."
            )

    # -- capture and replay ------------------------------------------------------------------------
    def _capture(self, batch) -> _Captured:
        inputs = tuple(t.detach().clone() for t in batch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        current = torch.cuda.current_stream(inputs[0].device)
        side = torch.cuda.Stream(device=inputs[0].device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):  # compiles and tunes every kernel; its gradients are dropped
                self._eager(inputs)
                for p in params:
                    p.grad = None
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.loss_fn(*inputs)
            self._check_loss_type(out)
            out.backward()
            loss = out.detach()
            dp_loss = out if isinstance(out, DPTensorFastGradientClipping) else None
        self._pool = graph.pool()
        captured = _Captured(graph, inputs, loss, [(p, p.grad) for p in params])
        if dp_loss is not None:
            module = dp_loss.module
            captured.dp_module, captured.optimizer, captured.clip = module, dp_loss.optimizer, module.max_grad_norm
            captured.finite_check, captured.norms = module.captured_finite_check, module.last_norms
            module.captured_finite_check = None
        for p in params:  # the capture ran nothing: the first replay computes this batch's gradients
            p.grad = None
        return captured

    def _replay(self, captured: _Captured, batch) -> torch.Tensor:
        for static, t in zip(captured.inputs, batch):
            static.copy_(t)
        if captured.optimizer is not None:
            captured.optimizer.zero_grad(set_to_none=True)  # what the eager DP backward does first
        elif any(p.grad is not None for p, _ in captured.grads):
            raise RuntimeError(
                "CudaGraphStep overwrites gradients and cannot accumulate them: call optimizer.zero_grad() (with "
                "set_to_none=True, the default) before each step."
            )
        captured.graph.replay()
        if captured.finite_check is not None and not captured.finite_check.result():
            captured.dp_module.reject_non_finite_step()
        for p, grad in captured.grads:
            if grad is not None and hasattr(grad, "_processed"):  # Opacus's "noised already" mark: fresh again
                del grad._processed
            p.grad = grad
        if captured.dp_module is not None:
            captured.dp_module.record_norms(captured.norms)
            mark_clipped([p for p, _ in captured.grads], 1)  # the replay wrote this step's clipped gradients
        return captured.loss.clone()
