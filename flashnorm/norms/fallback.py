"""Fallback for trainable layers without a FlashNorm rule: exact per-sample gradients for that layer only.

A layer type Opacus has a grad sampler for (a function of the layer input and output gradient alone) uses
it. Any other layer, its children included, is differentiated per sample with ``torch.func`` over the *live*
module and the call that actually ran: its first input, the other positional arguments and the keyword
arguments of that forward (a tensor whose leading dimension is the batch is split per sample, anything else
is shared), with the module's current attributes and parameters (a layer holding buffers is refused: a
per-sample re-run could update them). Costs B·|θ| memory for that layer;
its gradient is never dropped. A layer that draws random numbers in training (dropout) cannot be
re-run per sample and raises torch.func's error.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
from opacus.grad_sample import GradSampleModule
from torch.func import functional_call, grad, vmap

from .registry import NormRule


class PerSampleGradFallback(NormRule):
    """Per-sample gradients of one layer: Opacus's grad sampler, else ``torch.func`` over the live call."""

    methods = ("per_sample",)

    def __init__(self, layer: nn.Module):
        self.sampler = GradSampleModule.GRAD_SAMPLERS.get(type(layer))
        self.covers_children = self.sampler is None
        if self.covers_children and any(True for _ in layer.buffers()):
            # Re-running a forward per sample would update running statistics B more times.
            raise NotImplementedError("it holds buffers, which a per-sample re-run of its forward could update")
        #: The rest of each captured call, keyed by the id of its captured first input (kept alive by the capture).
        self.calls: Dict[int, Tuple[tuple, dict]] = {}

    @property
    def needs_call(self) -> bool:
        """The forward hook must hand over the whole call (`remember_call`)."""
        return self.sampler is None

    def remember_call(self, x: torch.Tensor, args: tuple, kwargs: dict, first_use: bool, layer=None) -> None:
        """Records the positional arguments after the first and the keyword arguments of the call whose first
        input (batch first) is ``x`` (``layer``: the module called)."""
        if first_use:
            self.calls.clear()
        detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
        self.calls[id(x)] = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})

    def per_sample_grads(self, layer, x, g, out=None, *, backend=None):  # new tensors: the caller copies them
        if self.sampler is not None:
            grads = self.sampler(layer, [x], g)
            return {p: gs for p, gs in grads.items() if p.requires_grad}
        args, kwargs = self.calls.get(id(x), ((), {}))
        return _per_sample_grads_of_call(layer, x, args, kwargs, g)


def _per_sample_grads_of_call(layer: nn.Module, x, args: tuple, kwargs: dict, g) -> Dict[nn.Parameter, torch.Tensor]:
    """∇_θ ⟨layer(x_b, *args_b, **kwargs_b), g_b⟩ for every sample b and trainable θ (children included)."""
    batch = x.shape[0]
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    trainable = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in layer.named_parameters() if not p.requires_grad}
    state = frozen

    def per_sample(t):
        return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch

    arg_dims = tuple(0 if per_sample(a) else None for a in args)
    kwarg_dims = {k: 0 if per_sample(v) else None for k, v in kwargs.items()}

    def one(a):
        return a.unsqueeze(0) if isinstance(a, torch.Tensor) else a

    def sample_loss(params, x_b, args_b, kwargs_b, g_b):
        batched_args = tuple(one(a) if d == 0 else a for a, d in zip(args_b, arg_dims))
        batched_kwargs = {k: one(v) if kwarg_dims[k] == 0 else v for k, v in kwargs_b.items()}
        out = functional_call(layer, {**params, **state}, (x_b.unsqueeze(0), *batched_args), batched_kwargs)
        return (out * g_b.unsqueeze(0).to(out.dtype)).sum()

    grads = vmap(grad(sample_loss), in_dims=(None, 0, arg_dims, kwarg_dims, 0))(trainable, x, args, kwargs, g)
    params = dict(layer.named_parameters())
    return {params[n]: grads[n] for n in names}
