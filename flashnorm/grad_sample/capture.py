"""Capture: which layers are hooked, what their forward keeps (X), and where their output gradient (G) arrives.

Every layer that owns trainable parameters is a `HookedLayer`. Its forward hook keeps its input X
(batch first) and routes its output through a `GradientTap`: an identity autograd function whose
backward hands the output gradient G to the layer's callback. A backward pass to the taps alone,
``torch.autograd.grad(Σ_b ℓ_b, [tap])``, reaches every layer's G while autograd computes no parameter
gradient. Layers whose rule computes in autocast's lower precision get their input already cast by a
forward pre-hook, so the X kept is the very tensor autograd saves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..norms import PerSampleGradFallback, get_norm_rule
from ..norms.registry import NormRule, trainable_own_parameters
from .aliases import ParameterAliases, registrations

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


class RowScale(torch.autograd.Function):
    """Identity on a model output; its backward multiplies the gradient's batch rows by the step's clipping
    coefficients once they are set (``scale.coef``: c [B], applied along ``batch_dim``), so a second backward of
    Σ ℓ gives Σ_b c_b ∇ℓ_b whatever order or layout the loss puts the samples in."""

    @staticmethod
    def forward(ctx, output, scale, batch_dim):
        ctx.scale, ctx.batch_dim = scale, batch_dim
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        coef = ctx.scale.coef
        if coef is None:
            return grad_output, None, None
        ctx.scale.reached += 1
        shape = [1] * grad_output.dim()
        shape[ctx.batch_dim] = -1
        scaled = grad_output.to(torch.promote_types(grad_output.dtype, coef.dtype)) * coef.view(shape)
        return scaled.to(grad_output.dtype), None, None


@dataclass(eq=False)
class OutputScale:
    """The coefficients the model outputs' `RowScale` apply (``None`` during the norm pass), how many output
    gradients they scaled, and whether every output's batch dimension was known.

    An output's batch dimension is the layers' (0, or 1 for ``batch_first=False``) when it is the last hooked layer's
    output itself, else its one dimension of the batch's size; an output with several such dimensions is
    ``ambiguous`` (its rows cannot be told apart)."""

    coef: Optional[torch.Tensor] = None
    reached: int = 0
    tapped: int = 0  # outputs of the forward that carry a RowScale
    ambiguous: bool = False


def scale_rows(output, scale: OutputScale, layout_dim: int, batch_size: int, last_layer_output=None):
    """``output`` (a tensor, or a tuple, list or mapping of them, e.g. a Hugging Face ``ModelOutput``) with every
    tensor that requires grad and holds the batch routed through `RowScale` along its batch dimension (see
    `OutputScale`; ``layout_dim``: the layers' batch dimension)."""
    if isinstance(output, torch.Tensor):
        if not output.requires_grad:
            return output
        if output is last_layer_output:
            batch_dim = layout_dim
        else:
            dims = [d for d, size in enumerate(output.shape) if size == batch_size]
            if len(dims) != 1:
                scale.ambiguous = scale.ambiguous or len(dims) > 1
                return output
            batch_dim = dims[0]
        scale.tapped += 1
        return RowScale.apply(output, scale, batch_dim)
    if isinstance(output, (tuple, list)):
        mapped = [scale_rows(o, scale, layout_dim, batch_size, last_layer_output) for o in output]
        if isinstance(output, list):
            return mapped
        return type(output)(*mapped) if hasattr(output, "_fields") else tuple(mapped)
    if isinstance(output, dict):
        for key in list(output.keys()):
            output[key] = scale_rows(output[key], scale, layout_dim, batch_size, last_layer_output)
        return output
    return output


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
    """A layer that owns trainable parameters, with its rule: what stays the same from step to step.

    A layer called k times in one forward pass (the same module twice, a module under two names, an RNN cell
    per time step) has k *uses*; what one step captured of them is its `LayerCapture`.
    """

    name: str
    module: nn.Module
    rule: NormRule
    params: List[nn.Parameter]
    index: int = 0  # position in the hooked model's ``layers`` (the step's captures are indexed by it)
    vectors: List[nn.Parameter] = field(default_factory=list)  # the rule's vector_params, kept per sample
    shared: List[nn.Parameter] = field(default_factory=list)  # parameters another layer uses too (tied weights)
    handles: list = field(default_factory=list)
    callback: Optional[Callable] = None  # the tap's callback, bound once
    plan: Optional[tuple] = None  # ((shapes, dtype), method) of the last call
    batch_first: bool = True  # its inputs and outputs are [B, ...] (the model's layout, or the layer's own)


@dataclass(eq=False)
class LayerCapture:
    """What one step captured of one layer: inputs ``xs`` in forward order (``None`` where activation
    checkpointing's recompute will supply it) and their output gradients ``gs``, which arrive in the backward
    pass in any order."""

    xs: List[Optional[torch.Tensor]] = field(default_factory=list)
    gs: List[Optional[torch.Tensor]] = field(default_factory=list)
    arrived: int = 0  # output gradients received this pass
    out_meta: Optional[tuple] = None  # (batch-first shape, dtype) of the first use's output: G's shape and dtype

    @property
    def x(self) -> Optional[torch.Tensor]:
        """The first use's input (``None`` when nothing is captured)."""
        return self.xs[0] if self.xs else None

    def complete(self) -> bool:
        """Every use's output gradient and input are in."""
        return self.arrived == len(self.xs) and all(x is not None for x in self.xs)

    def take(self) -> tuple:
        """(xs, gs), leaving the capture empty (its uses are counted once)."""
        xs, gs = self.xs, self.gs
        self.xs, self.gs, self.arrived = [], [], 0
        return xs, gs


def discover_layers(module: nn.Module, name: str = "", seen: Optional[set] = None):
    """Yields a `HookedLayer` for each module owning trainable parameters, depth first (a module
    registered under several names once, under its first name).

    A layer without a rule, or whose rule refuses it, falls back to exact per-sample gradients
    (`PerSampleGradFallback`); a fallback that covers its children hides them.

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


def in_checkpointed_region() -> bool:
    """Whether this forward runs inside non-reentrant ``torch.utils.checkpoint`` (its saved-tensor hooks are
    on top), whose backward recomputes it."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", "")


@dataclass(eq=False)
class HookedModel:
    """The hooked layers of a wrapped module and what connects them, fixed until ``requires_grad`` changes.

    Attributes:
        layers: the `HookedLayer`s, depth first (``layer.index`` is the position here).
        shared_groups: (θ, layers using θ) for each parameter used by two or more layers (tied weights).
        hooked_params: every parameter of a hooked layer, once.
        aliases: the layers' `ParameterAliases`.
        taps: the gradient taps, one scalar leaf per device (made by the first capturing forward there).
        group_plans: the layer groups planned per capture signature
            (`flashnorm.grad_sample.layer_groups.plan_layer_groups`).
    """

    layers: List[HookedLayer]
    shared_groups: List[Tuple[nn.Parameter, List[HookedLayer]]]
    hooked_params: List[nn.Parameter]
    aliases: ParameterAliases
    taps: Dict[torch.device, torch.Tensor] = field(default_factory=dict)
    group_plans: dict = field(default_factory=dict)

    def tap_on(self, device: torch.device) -> torch.Tensor:
        """The gradient tap of ``device``."""
        tap = self.taps.get(device)
        if tap is None:
            tap = self.taps[device] = torch.zeros((), device=device, requires_grad=True)
        return tap


def _always_batch_first(module: nn.Module) -> bool:
    """Layers called with [B, ...] whatever the model's layout: Opacus's DP RNN cells' ``RNNLinear`` (one call per
    time step on [B, D])."""
    from opacus.layers.dp_rnn import RNNLinear

    return isinstance(module, RNNLinear)


def hook_model(module: nn.Module, *, shared_allowed: bool = True, batch_first: bool = True,
               counterpart: Optional[Callable[[nn.Parameter], Optional[nn.Parameter]]] = None) -> HookedModel:
    """Discovers the hooked layers of ``module`` and the parameters two of them share (tied weights).

    Args:
        module: the wrapped module.
        shared_allowed: ``False`` under FSDP2, whose one-pass reduction is per layer.
        batch_first: the model's layout (a layer called with [B, ...] whatever it is keeps its own).
        counterpart: the tensor that stands for a parameter in its registrations while its layer runs, when not
            the parameter itself (FSDP2's unsharded parameter).

    Raises:
        NotImplementedError: a layer that neither a rule nor the fallback can serve; a shared parameter where
            ``shared_allowed`` is ``False``.
    """
    layers = list(discover_layers(module))
    users: Dict[int, list] = {}
    for index, layer in enumerate(layers):
        layer.index = index
        layer.batch_first = batch_first or _always_batch_first(layer.module)
        for p in layer.params:
            users.setdefault(id(p), [p]).append(layer)
    shared_groups = [(found[0], found[1:]) for found in users.values() if len(found) > 2]
    for param, sharing in shared_groups:
        if not shared_allowed:
            raise NotImplementedError(
                f"Layers {[layer.name for layer in sharing]} share a parameter (weight tying); FlashNorm computes "
                "its cross terms on one device or under DDP, not yet under FSDP2. Fix: untie the weights or use "
                "grad_sample_mode='hooks'."
            )
        for layer in sharing:
            layer.shared.append(param)
    hooked_params = list({id(p): p for layer in layers for p in layer.params}.values())
    aliases = ParameterAliases({
        layer: registrations(list(layer.module.modules()) if layer.rule.covers_children else [layer.module],
                             layer.params)
        for layer in layers
    }, counterpart=counterpart)  # fmt: skip
    return HookedModel(layers, shared_groups, hooked_params, aliases)


def refuse_parameter_hooks(params: List[nn.Parameter], names: Dict[int, str]) -> None:
    """Raises when a trainable parameter has a gradient hook of its own (``register_hook``,
    ``register_post_accumulate_grad_hook``): the norm pass measures each sample's gradient before any such hook, so
    what the hook changes would escape the bound (a second backward runs it; an assembled gradient skips it).

    Raises:
        NotImplementedError: naming the parameter and the fix.
    """
    for p in params:
        if p._backward_hooks or p._post_accumulate_grad_hooks:
            raise NotImplementedError(
                f"Parameter '{names.get(id(p), '?')}' has a gradient hook (register_hook or "
                "register_post_accumulate_grad_hook). FlashNorm bounds each sample's gradient as autograd computes it; "
                "a hook that changes it would escape the bound. Remove the hook, or change p.grad after the DP "
                "backward and before optimizer.step() (the change then applies to the clipped sum)."
            )
