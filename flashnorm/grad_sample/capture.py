"""Capture: which layers are hooked, what their forward keeps (X), and where their output gradient (G) arrives.

Every layer that owns trainable parameters is a :class:`HookedLayer`. Its forward hook keeps its input X
(batch first) and routes its output through a :class:`GradientTap`: an identity autograd function whose
backward hands the output gradient G to the layer's callback. A backward pass to the taps alone,
``torch.autograd.grad(Σ_b ℓ_b, [tap])``, reaches every layer's G while autograd computes no parameter
gradient. Layers whose rule computes in autocast's lower precision get their input already cast by a
forward pre-hook, so the X kept is the very tensor autograd saves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from ..norms import PerSampleGradFallback, get_norm_rule
from ..norms.registry import NormRule, trainable_own_parameters

logger = logging.getLogger(__name__)


class GradientTap(torch.autograd.Function):
    """Identity on a layer output; its backward hands the output gradient to ``callback(grad, key)``.

    ``tap`` is a scalar leaf that requires grad: differentiating to it reaches every tapped layer. The result
    shares the output's memory and version counter but is not an autograd view of it, so in-place ops after
    the layer (``ReLU(inplace=True)``, ``out += identity``) work, and are refused exactly where PyTorch
    refuses them without the tap (an output the layer saved for its own backward).
    """

    @staticmethod
    def forward(ctx, output, tap, callback, key):
        ctx.callback, ctx.key = callback, key
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.callback(grad_output, ctx.key)
        return grad_output, None, None, None


#: Dtypes autocast casts for its lower-precision ops (float64 is left alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_target(x) -> Optional[torch.dtype]:
    """The dtype autocast casts tensor ``x`` to for a lower-precision op (a matmul) here, or ``None`` where
    it leaves ``x`` as it is (autocast off on its device, an ineligible dtype, already that dtype)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _AUTOCAST_ELIGIBLE:
        return None
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if dtype == x.dtype else dtype


@dataclass(eq=False)
class HookedLayer:
    """A layer that owns trainable parameters, with its rule and this step's captures.

    A layer called k times in one forward pass (the same module twice, a module under two names, an RNN
    cell per time step) has k *uses*: inputs ``xs`` in forward order and their output gradients ``gs``,
    which arrive in the backward pass in any order.
    """

    name: str
    module: nn.Module
    rule: NormRule
    params: List[nn.Parameter]
    xs: List[torch.Tensor] = field(default_factory=list)  # this step's inputs, batch first, one per use
    gs: List[Optional[torch.Tensor]] = field(default_factory=list)  # their output gradients, as they arrive
    arrived: int = 0  # output gradients received this pass
    out_meta: Optional[tuple] = None  # (batch-first shape, dtype) of the first use's output: G's shape and dtype
    kept: Optional[object] = None  # one pass only: a :mod:`~flashnorm.grad_sample.kept` record
    vectors: List[nn.Parameter] = field(default_factory=list)  # the rule's vector_params, kept per sample
    shared: List[nn.Parameter] = field(default_factory=list)  # parameters another layer uses too (tied weights)
    handles: list = field(default_factory=list)
    callback: Optional[Callable] = None  # the tap's callback, bound once
    captured_step: int = -1  # the step whose forward captured this layer (a recompute then only fills in X)
    plan: Optional[tuple] = None  # ((shapes, dtype), method) of the last call

    @property
    def x(self) -> Optional[torch.Tensor]:
        """The first use's input (``None`` when nothing is captured)."""
        return self.xs[0] if self.xs else None

    def forget(self) -> None:
        """Drops this step's captures."""
        self.xs, self.gs, self.arrived, self.kept = [], [], 0, None


def discover_layers(module: nn.Module, name: str = "", seen: Optional[set] = None):
    """Yields a :class:`HookedLayer` for each module owning trainable parameters, depth first (a module
    registered under several names once, under its first name).

    A layer without a rule, or whose rule refuses it, falls back to exact per-sample gradients
    (:class:`~flashnorm.norms.PerSampleGradFallback`); a fallback that covers its children hides them.

    Raises:
        NotImplementedError: neither a rule nor the fallback can serve the layer (its path in the message).
    """
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    own = trainable_own_parameters(module)
    if own:  # a parameter registered here and in a child too (Opacus's DP RNNs alias their cells') is the child's
        in_children = {id(p) for child in module.children() for p in child.parameters()}
        own = [p for p in own if id(p) not in in_children]
    covers_children = False
    if own:
        rule = get_norm_rule(module)
        reason = "it has no FlashNorm norm rule" if rule is None else rule.supports(module)
        if reason is not None:
            try:
                rule = PerSampleGradFallback(module)
            except NotImplementedError as err:
                raise NotImplementedError(
                    f"Layer '{name or '<root>'}' ({type(module).__name__}) is not supported: {reason}, "
                    f"and per-sample gradients cannot be computed for it ({err}). Fix: register a rule with "
                    "flashnorm.norms.register_norm_rule, replace the layer, or freeze its parameters."
                ) from err
            covers_children = rule.covers_children
            logger.info("layer %s (%s): %s; falling back to per-sample gradients", name, type(module).__name__, reason)
        params = [p for p in module.parameters() if p.requires_grad] if covers_children else own
        yield HookedLayer(name or "<root>", module, rule, params, vectors=rule.vector_params(module))
    if covers_children:
        return
    for child_name, child in module.named_children():
        yield from discover_layers(child, f"{name}.{child_name}" if name else child_name, seen)


def _in_checkpointed_region() -> bool:
    """Whether this forward runs inside non-reentrant ``torch.utils.checkpoint`` (its saved-tensor hooks are
    on top), whose backward recomputes it."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", "")


class CaptureHooks:
    """The forward side of a grad-sample module: hooks on its ``layers``, and the batch size they saw.

    The host class provides ``layers``, ``batch_first``, ``training``, ``_distributed``, ``_aliases`` (the
    layers' :class:`~flashnorm.grad_sample.aliases.ParameterAliases`), the step counter
    ``_step``, ``_capturing``, ``_forward_depth``, ``_no_grad_layers``,
    ``_capture_backward(layer, grad, key)``, ``_count_if_complete(layer)`` and ``_single_sample_step()``.
    """

    def add_hooks(self) -> None:
        for layer in self.layers:
            layer.callback = partial(self._capture_backward, layer)
        self._attach_forward_hooks()
        self.enable_hooks()

    def remove_hooks(self) -> None:
        self.disable_hooks()
        self._detach_forward_hooks()
        self._hooks_parked = False
        for layer in self.layers:
            layer.forget()

    def _attach_forward_hooks(self) -> None:
        for layer in self.layers:
            layer.handles.append(layer.module.register_forward_pre_hook(partial(self._enter_layer, layer)))
            if getattr(layer.rule, "needs_call", False):  # the fallback re-runs the whole call per sample
                hook = partial(self._capture_forward_call, layer)
                layer.handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
            else:
                layer.handles.append(layer.module.register_forward_hook(partial(self._capture_forward, layer)))

    def _detach_forward_hooks(self) -> None:
        for layer in self.layers:
            while layer.handles:
                layer.handles.pop().remove()

    def _park_forward_hooks(self, parked: bool) -> None:
        """Detaches the layers' forward hooks for a step of one sample (``parked``), or re-attaches them.

        Such a step captures nothing, and a module without hooks runs PyTorch's fast call path.
        """
        if parked == self._hooks_parked:
            return
        self._hooks_parked = parked
        if parked:
            self._detach_forward_hooks()
        else:
            self._attach_forward_hooks()

    def enable_hooks(self) -> None:
        """Turns capture back on (after :meth:`disable_hooks`)."""
        self.hooks_enabled = True

    def disable_hooks(self) -> None:
        """Turns capture off: the module then trains like the plain module."""
        self.hooks_enabled = False

    def _capturing_forward(self) -> bool:
        """Whether this forward captures: hooks on, the wrapper in training mode (its mode decides, not a
        layer's: a trainable layer left in eval mode inside a training forward still gets gradients, so its
        norm must be counted) and grad enabled."""
        return self.hooks_enabled and self.training and torch.is_grad_enabled()

    def _tap_on(self, device: torch.device) -> torch.Tensor:
        tap = self._taps.get(device)
        if tap is None:
            tap = self._taps[device] = torch.zeros((), device=device, requires_grad=True)
        return tap

    def _batch_first(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.batch_first else t.movedim(1, 0)

    def _leading_batch_size(self, inputs) -> Optional[int]:
        """The batch dimension of the first input when it is a tensor, else None."""
        first = inputs[0] if inputs else None
        dim = 0 if self.batch_first else 1
        return first.shape[dim] if isinstance(first, torch.Tensor) and first.dim() > dim else None

    def _fill_deferred_input(self, layer: HookedLayer, inputs) -> None:
        """The recompute's input for the next use whose X the forward left to it (in forward order)."""
        for i, x in enumerate(layer.xs):
            if x is None:
                x = self._batch_first(inputs[0].detach())
                if self._batch_size is not None and x.shape[0] == 1 != self._batch_size:
                    x = x.expand(self._batch_size, *x.shape[1:])
                layer.xs[i] = x
                self._count_if_complete(layer)
                return

    def _enter_layer(self, layer: HookedLayer, module: nn.Module, inputs):
        """Forward pre-hook: with hooks on, the layer's parameters are read through their aliases while it runs
        (:mod:`~flashnorm.grad_sample.aliases`; its forward hook points them back). Layers whose rule keeps X in
        autocast's lower precision (``rule.autocast_input``) get their first input already cast, so their own
        autocast cast is a no-op and the X captured after it is the very tensor autograd saves for the backward."""
        if self.hooks_enabled:
            self._aliases.enter(layer)
        if not layer.rule.autocast_input or not inputs or not self._capturing_forward():
            return None
        dtype = autocast_target(inputs[0])
        return None if dtype is None else (inputs[0].to(dtype), *inputs[1:])

    def _capture_forward_call(self, layer: HookedLayer, module: nn.Module, inputs, kwargs, output):
        return self._capture_forward(layer, module, inputs, output, kwargs)

    def _capture_forward(self, layer: HookedLayer, module: nn.Module, inputs, output, kwargs=None):
        self._aliases.leave(layer)
        if not self._capturing_forward():
            if self._forward_depth and self.hooks_enabled and self.training and not torch.is_grad_enabled():
                self._no_grad_layers = True  # reentrant checkpointing: captured when the backward recomputes it
            return None
        if self._single_sample_step() and self._leading_batch_size(inputs) == 1:
            return None  # B = 1, known from an earlier layer: nothing to capture (the fast path of every hook)
        if torch._C._current_graph_task_id() != -1:  # a recompute of activation checkpointing, in a backward pass
            if layer.captured_step == self._step:  # non-reentrant: the forward tapped this use; X may be due now
                self._fill_deferred_input(layer, inputs)
                return None
            if not self._capturing:
                return None  # reentrant, outside the norm pass: nothing to capture
        if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
            raise NotImplementedError(
                f"Layer '{layer.name}' ({type(module).__name__}) must take a tensor as its first input and return "
                "one tensor for FlashNorm's hooks."
            )
        x = self._batch_first(inputs[0].detach())
        batch_dim = 0 if self.batch_first else 1
        if self._batch_size is None:
            self._batch_size = x.shape[0]
        elif x.shape[0] != self._batch_size:
            if x.shape[0] != 1 or output.shape[batch_dim] != 1:
                raise ValueError(
                    f"Layer '{layer.name}' saw batch size {x.shape[0]} but an earlier layer saw {self._batch_size} in "
                    f"the same forward pass. Check batch_first (now {self.batch_first}); a layer shared by the whole "
                    "batch (e.g. position embeddings) must get a batch dimension of 1, wpe(positions.unsqueeze(0)), "
                    "and run after a layer that sees the full batch."
                )
            # Shared by the batch and broadcast downstream: expand it so that its output gradient
            # arrives per sample (sample b's gradient of a shared layer is rule(X, G_b)).
            x = x.expand(self._batch_size, *x.shape[1:])
            output = output.expand(*(self._batch_size if i == batch_dim else -1 for i in range(output.dim())))
        if self._single_sample_step():
            return None  # the batch gradient is the per-sample gradient: nothing to capture
        if not layer.xs:
            shape = output.shape if self.batch_first else (output.shape[1], output.shape[0], *output.shape[2:])
            layer.out_meta = (shape, output.dtype)
        layer.captured_step = self._step
        # Inside a non-reentrant checkpointed region X is taken from the recompute, keeping the memory saving.
        layer.xs.append(None if _in_checkpointed_region() else x)
        if kwargs is not None:
            if layer.xs[-1] is None:
                raise NotImplementedError(
                    f"Layer '{layer.name}' has no norm rule and runs inside activation checkpointing; FlashNorm's "
                    "per-sample fallback needs its call. Fix: register a rule, or checkpoint outside this layer."
                )
            layer.rule.remember_call(x, inputs[1:], kwargs, first_use=len(layer.xs) == 1)
        layer.gs.append(None)
        key = (self._step, len(layer.xs) - 1)
        return GradientTap.apply(output, self._tap_on(output.device), layer.callback, key)
