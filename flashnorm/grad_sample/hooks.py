"""The hooks a grad-sample module puts on its layers, and what they hand to the step in progress.

Each hooked layer gets a forward pre-hook (its parameters are read through their aliases while it runs, and layers
whose rule keeps X in autocast's lower precision get their input already cast, so the X captured is the very
tensor autograd saves), a forward hook (X recorded in the step, the output routed through a
`GradientTap`) and the tap's callback (G handed to the step). For a batch of
one sample the forward hooks are detached altogether ("parked"): nothing is captured and the layers take PyTorch's
hook-free call path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from functools import partial
from typing import Optional

import torch
import torch.nn as nn

from .capture import GradientTap, HookedLayer, autocast_target, in_checkpointed_region
from .phases import BACKWARD_HOOK, FORWARD_HOOK, phase, recording
from .step import StepState

#: Keyword values that hold no tensor (a model's flags and options: ``use_cache=False``, ``num_items_in_batch=...``).
_PLAIN_VALUES = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _leaves(value):
    """The values inside ``value``'s nested mappings, lists and tuples (``value`` itself when it is none)."""
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


class LayerHooks:
    """The layers' hooks of one grad-sample module (``owner``), which they ask for its mode and its current step.

    The owner provides ``hooked`` (`HookedModel`), ``hooks_enabled``,
    ``training``, ``batch_first``, ``step`` (the step in progress or ``None``) and ``capturing_forward()``. Layers
    capture only inside the owner's training forward, or when a backward recomputes them (activation
    checkpointing): the user's module called directly computes as it would unwrapped.
    """

    def __init__(self, owner):
        self.owner = owner
        self.parked = False  # forward hooks detached for steps of one sample
        self.forward_depth = 0  # inside the owner's capturing forward

    # -- attaching ------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Binds every layer's tap callback and attaches its forward hooks."""
        for layer in self.owner.hooked.layers:
            layer.callback = partial(self._capture_backward, layer)
        self._attach_forward_hooks()

    def detach(self) -> None:
        """Removes every forward hook."""
        self._detach_forward_hooks()
        self.parked = False

    def park(self, parked: bool) -> None:
        """Detaches the layers' forward hooks for a step of one sample (``parked``), or re-attaches them."""
        if parked == self.parked:
            return
        self.parked = parked
        if parked:
            self._detach_forward_hooks()
        else:
            self._attach_forward_hooks()

    def _attach_forward_hooks(self) -> None:
        """The capture hook goes before every other forward hook of the layer (``prepend``): the tap sees the
        layer's own output, and a hook that changes it acts downstream of the tap, like any later op."""
        for layer in self.owner.hooked.layers:
            layer.handles.append(layer.module.register_forward_pre_hook(partial(self._enter_layer, layer)))
            if getattr(layer.rule, "needs_call", False):  # the fallback re-runs the whole call per sample
                hook = partial(self._capture_forward_call, layer)
                layer.handles.append(layer.module.register_forward_hook(hook, with_kwargs=True, prepend=True))
            else:
                hook = partial(self._capture_forward, layer)
                layer.handles.append(layer.module.register_forward_hook(hook, prepend=True))

    def _detach_forward_hooks(self) -> None:
        for layer in self.owner.hooked.layers:
            while layer.handles:
                layer.handles.pop().remove()

    @contextlib.contextmanager
    def in_forward(self):
        """Marks the owner's capturing forward (layers running under ``no_grad`` inside it are recomputed later)."""
        self.forward_depth += 1
        try:
            yield
        finally:
            self.forward_depth -= 1
            self.owner.hooked.aliases.leave_all()  # (a layer whose forward raised)

    # -- helpers ----------------------------------------------------------------------------------------
    def leading_batch_size(self, inputs) -> Optional[int]:
        """The batch dimension of the first input when it is a tensor, else None."""
        first = inputs[0] if inputs else None
        dim = 0 if self.owner.batch_first else 1
        return first.shape[dim] if isinstance(first, torch.Tensor) and first.dim() > dim else None

    def call_batch_size(self, args, kwargs) -> Optional[int]:
        """The batch size of a call of the model: its first positional input's (`leading_batch_size`); for a call
        with keyword arguments alone (Hugging Face's ``model(**batch)``), the batch dimension its tensors all share,
        found in nested lists, tuples and dicts too. ``None`` where they do not all have it, where one is too small
        to have one, or where an argument is an object that could hold tensors out of sight: the caller then treats
        the batch as of unknown size (never as one sample)."""
        if args:
            return self.leading_batch_size(args)
        dim = 0 if self.owner.batch_first else 1
        sizes = set()
        for leaf in _leaves(kwargs):
            if isinstance(leaf, torch.Tensor):
                if leaf.dim() <= dim:
                    return None
                sizes.add(leaf.shape[dim])
            elif not isinstance(leaf, _PLAIN_VALUES):
                return None
        return sizes.pop() if len(sizes) == 1 else None

    # -- the hooks ---------------------------------------------------------------------------------------
    def _enter_layer(self, layer: HookedLayer, module: nn.Module, inputs):
        """Forward pre-hook: aliases in (`aliases`; the forward hook points them back),
        and autocast's cast of X done here for rules that keep X in its lower precision (``rule.autocast_input``)."""
        owner = self.owner
        if owner.hooks_enabled:
            owner.hooked.aliases.enter(layer)
        if not layer.rule.autocast_input or not inputs or not owner.capturing_forward():
            return None
        dtype = autocast_target(inputs[0])
        return None if dtype is None else (inputs[0].to(dtype), *inputs[1:])

    def _capture_forward_call(self, layer: HookedLayer, module: nn.Module, inputs, kwargs, output):
        return self._capture_forward(layer, module, inputs, output, kwargs)

    def _capture_forward(self, layer: HookedLayer, module: nn.Module, inputs, output, kwargs=None):
        owner = self.owner
        owner.hooked.aliases.leave(layer)
        step = owner.step
        if not owner.capturing_forward():
            if self.forward_depth and owner.hooks_enabled and owner.training and not torch.is_grad_enabled():
                step.recomputes_layers = True  # reentrant checkpointing: captured when recomputed
            return None
        if step is None or (not self.forward_depth and torch._C._current_graph_task_id() == -1):
            return None  # the user's module called directly, outside the wrapper's forward: nothing is captured
        if not recording():
            return self._record_forward(step, layer, module, inputs, output, kwargs)
        with phase(FORWARD_HOOK):
            return self._record_forward(step, layer, module, inputs, output, kwargs)

    def _record_forward(self, step, layer: HookedLayer, module: nn.Module, inputs, output, kwargs):
        if step.single_sample and self.leading_batch_size(inputs) == 1:
            return None  # B = 1, known from an earlier layer: nothing to capture (the fast path of every hook)
        if torch._C._current_graph_task_id() != -1:  # a recompute of activation checkpointing, in a backward pass
            if step.captured(layer):  # non-reentrant: the forward tapped this use; X may be due now
                step.fill_deferred_input(layer, _batch_first(layer, inputs[0].detach()))
                return None
            if step.state is not StepState.NORM_PASS:
                return None  # reentrant, outside the norm pass: nothing to capture
        if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
            raise NotImplementedError(
                f"Layer '{layer.name}' ({type(module).__name__}) must take a tensor as its first input and return "
                "one tensor for FlashNorm's hooks."
            )
        x = _batch_first(layer, inputs[0].detach())
        batch_first = layer.batch_first
        batch_dim = 0 if batch_first else 1
        if step.batch_size is None:
            step.batch_size = x.shape[0]
        elif x.shape[0] != step.batch_size:
            if x.shape[0] != 1 or output.shape[batch_dim] != 1:
                raise ValueError(
                    f"Layer '{layer.name}' saw batch size {x.shape[0]} but an earlier layer saw {step.batch_size} in "
                    f"the same forward pass. Check batch_first (now {batch_first}); a layer shared by the whole "
                    "batch (e.g. position embeddings) must get a batch dimension of 1, wpe(positions.unsqueeze(0)), "
                    "and run after a layer that sees the full batch."
                )
            # Shared by the batch and broadcast downstream: expand it so that its output gradient
            # arrives per sample (sample b's gradient of a shared layer is rule(X, G_b)).
            x = x.expand(step.batch_size, *x.shape[1:])
            output = output.expand(*(step.batch_size if i == batch_dim else -1 for i in range(output.dim())))
        if step.single_sample:
            return None  # the batch gradient is the per-sample gradient: nothing to capture
        # Inside a non-reentrant checkpointed region X is taken from the recompute, keeping the memory saving.
        deferred = in_checkpointed_region()
        step.checkpointed = step.checkpointed or deferred
        if kwargs is not None and deferred:
            raise NotImplementedError(
                f"Layer '{layer.name}' has no norm rule and runs inside activation checkpointing; FlashNorm's "
                "per-sample fallback needs its call. Fix: register a rule, or checkpoint outside this layer."
            )
        shape = output.shape if batch_first else (output.shape[1], output.shape[0], *output.shape[2:])
        use = step.record_input(layer, None if deferred else x, (shape, output.dtype))
        if kwargs is not None:
            layer.rule.remember_call(x, inputs[1:], kwargs, first_use=use == 0, layer=module)
        tapped = GradientTap.apply(output, self.owner.hooked.tap_on(output.device), layer.callback, (step.number, use))
        step.last_layer_output = tapped
        return tapped

    def _capture_backward(self, layer: HookedLayer, grad_output: torch.Tensor, key) -> None:
        """The gradient tap's callback: G to the step in progress (ignored when none is). A plain backward's first
        gradient queues the owner's ``finish_plain_backward(step)`` for the end of that backward (Opacus's norms)."""
        step = self.owner.step
        if step is None:
            return
        if not recording():
            started = step.receive_gradient(layer, grad_output, *key)
        else:
            with phase(BACKWARD_HOOK):
                started = step.receive_gradient(layer, grad_output, *key)
        if started:
            torch.autograd.Variable._execution_engine.queue_callback(partial(self.owner.finish_plain_backward, step))


def _batch_first(layer: HookedLayer, t: torch.Tensor) -> torch.Tensor:
    """``t`` of ``layer`` as [B, ...]."""
    return t if layer.batch_first else t.movedim(1, 0)
