"""Shared machinery of FlashNorm's grad-sample modules (two-pass and one-pass).

Every layer that owns trainable parameters gets a forward hook. The hook keeps the layer input X
and routes the output through an *anchor*: an identity autograd function whose backward receives
the output gradient G. The *norm pass*

    torch.autograd.grad(Σ_b ℓ_b, [anchor])

walks the whole graph down to the lowest anchor, so every hooked layer sees its G, but autograd
computes no parameter gradient (no parameter is an input of that call: the layers' backward
nodes compute input gradients only). The layer's norm rule turns (X, G) into the per-sample
squared norms, summed into ``norm_sq[b]``; then c_b = min(1, C / (‖g_b‖ + 1e-6)).

Subclasses write Σ_b c_b ∇ℓ_b into ``p.grad``: a second backward pass of Σ_b c_b ℓ_b
(:class:`GradSampleModuleFastGradientClipping`) or assembly from what the norm pass kept
(:class:`GradSampleModuleFastGradientClippingFuse`).

G is the gradient of the *sum* of per-sample losses whatever ``loss_reduction`` is; the
reduction is applied by the DP optimizer (division by the expected batch size for ``mean``),
exactly as in Opacus.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.validators import ModuleValidator

from ..kernels import multi_tensor
from ..kernels._chunks import accumulation_dtype, accumulation_dtype_of
from ..kernels.backend import environment_read_once
from ..norms import PerSampleGradFallback, get_norm_rule
from ..norms.planner import METHODS, choose, forced_method
from ..norms.registry import NormRule, per_sample_norms, trainable_own_parameters
from .arena import PerSampleArena

logger = logging.getLogger(__name__)


def _is_distributed(module: nn.Module) -> bool:
    """True when gradients of ``module`` are reduced across ranks by DDP or FSDP2 hooks."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, DistributedDataParallel) or any(isinstance(m, FSDPModule) for m in module.modules())


class _Anchor(torch.autograd.Function):
    """Identity on a layer output; its backward hands the output gradient to ``capture``."""

    @staticmethod
    def forward(ctx, output, anchor, capture, step):
        ctx.capture, ctx.step = capture, step
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        ctx.capture(grad_output, ctx.step)
        return grad_output, None, None, None


def _anchor_node_type():
    probe = torch.zeros((), requires_grad=True)
    return type(_Anchor.apply(probe, probe, None, 0).grad_fn)


_ANCHOR_NODE = _anchor_node_type()


#: Dtypes autocast casts for its lower-precision ops (float64 is left alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_target(x) -> Optional[torch.dtype]:
    """The dtype autocast casts tensor ``x`` to for a lower-precision op (a matmul) here, or ``None`` where
    it leaves ``x`` as it is (autocast off on its device, an ineligible dtype, already that dtype)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _AUTOCAST_ELIGIBLE:
        return None
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if dtype == x.dtype else dtype


_NON_FINITE = (
    "The loss is not finite (NaN or inf) for some sample; the gradients were discarded and no parameter "
    "changed. Check the learning rate, the inputs, or use a loss scaler under fp16."
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


class _FiniteCheck:
    """Whether every per-sample loss is finite, read without draining the GPU.

    On CUDA the flag is computed and copied to a pinned host flag behind the forward's kernels, and an
    event marks the copy; :meth:`result` waits for that event only — by the end of the backward's
    issue the forward has long finished, so the wait is normally nothing, where ``bool(flag)`` would
    wait for the whole backward and leave the GPU idle while the optimizer step is issued. The host
    flag is reused (a step's check is read before the next step begins).

    Under CUDA-graph capture (``capturing``) the flag stays on the device and an *external* event
    behind it becomes a node of the graph, recorded by every replay. :meth:`result`, called after a
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


@dataclass(eq=False)
class HookedLayer:
    """A layer that owns trainable parameters, with its rule and this step's captures."""

    name: str
    module: nn.Module
    rule: NormRule
    params: List[nn.Parameter]
    x: Optional[torch.Tensor] = None
    out_meta: Optional[tuple] = None  # (batch-first shape, dtype) of this step's output: G's shape and dtype
    kept: Optional[tuple] = None  # one-pass only: ("per_sample" | "arena", grads) or (method, x, g, with_vectors)
    vectors: List[nn.Parameter] = field(default_factory=list)  # the rule's vector_params, kept per sample in one pass
    handles: list = field(default_factory=list)
    capture: Optional[Callable] = None  # the anchor's callback, bound once
    graph_ends: Optional[tuple] = None  # (output node, input node) of the first step, for the use check
    plan: Optional[tuple] = None  # (shapes, dtype, forced method) -> method of the last call


class FlashNormGradSampleModule(AbstractGradSampleModule):
    """Base of FlashNorm's grad-sample modules; see the module docstring for the algorithm.

    Args:
        m: the module to wrap; its parameters stay the same ``Parameter`` objects.
        batch_first: inputs are ``[B, ...]`` (else ``[T, B, ...]``).
        loss_reduction: ``"mean"`` or ``"sum"`` (applied by the optimizer, as in Opacus).
        max_grad_norm: the clipping bound C.
        use_flash_clipping: flash norms, the planner choosing per layer (default).
        use_ghost_clipping: with ``use_flash_clipping=False``, Gram (ghost) norms; both ``False``
            gives per-sample-gradient norms.
        strict: validate the module with Opacus's ``ModuleValidator`` (e.g. no BatchNorm).
        norm_method: force one method (``"flash"``, ``"gram"``, ``"per_sample"``) where a
            layer's rule has it; ``None`` lets the planner choose.
    """

    #: Backward passes per step: 2 (norm pass + clipped pass) or 1 (norm pass + assembly).
    passes = 2
    #: Per-sample gradients laid out in one :class:`PerSampleArena`: their norms take one reduction per
    #: buffer, and in one pass their clipped sums one GEMV. Two-pass modes keep only vector parameters there
    #: (biases, normalisation weights: B × n elements each), for the norm pass alone.
    uses_arena = True

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        max_grad_norm: float = 1.0,
        use_flash_clipping: bool = True,
        use_ghost_clipping: bool = True,
        strict: bool = True,
        norm_method: Optional[str] = None,
    ):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: only 'mean' and 'sum' are supported.")
        if not isinstance(max_grad_norm, (int, float)) or max_grad_norm <= 0:
            raise ValueError(
                f"max_grad_norm={max_grad_norm!r}: FlashNorm's clipping modes need one positive number "
                "(flat clipping); per-layer bounds need grad_sample_mode='hooks'."
            )
        if norm_method not in (None, "auto", *METHODS):
            raise ValueError(f"norm_method={norm_method!r} is not one of auto, {', '.join(METHODS)}.")
        if strict:
            ModuleValidator.validate(m, strict=True)
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.max_grad_norm = float(max_grad_norm)
        self.base_method = "flash" if use_flash_clipping else ("gram" if use_ghost_clipping else "per_sample")
        self.norm_method = None if norm_method == "auto" else norm_method
        self.trainable_parameters = [p for p in m.parameters() if p.requires_grad]
        self.layers = list(self._discover_layers(m, ""))
        self._check_no_shared_parameters()
        self._anchors: Dict[torch.device, torch.Tensor] = {}
        self._capturing = False
        self._batch_size: Optional[int] = None
        self._step = 0  # counts capturing forward passes; anchors remember theirs
        self._uses_checked = False  # parameters used outside their layer: checked on the first step
        self._forced_method: Optional[str] = None  # FLASHNORM_NORM_METHOD, read once per norm pass
        self._norm_sq: Optional[torch.Tensor] = None
        self._norm_terms: List[torch.Tensor] = []  # squared per-sample norms, one [B] per layer
        self._norm_roots: List[torch.Tensor] = []  # per-sample norms, one [B] per parameter
        self._arena: Optional[PerSampleArena] = None
        self._per_sample_gradient_norms: Optional[torch.Tensor] = None
        #: The loss check of a step captured in a CUDA graph (read after each replay), else None.
        self.captured_finite_check: Optional[_FiniteCheck] = None
        self._distributed = _is_distributed(m)
        self._hooks_parked = False  # forward hooks detached for steps of one sample (:meth:`_park_forward_hooks`)
        self._last_leading_batch_size: Optional[int] = None  # of the last capturing forward's first argument
        self.hooks_enabled = False
        self.add_hooks()

    # -- construction --------------------------------------------------------------------------
    def _discover_layers(self, module: nn.Module, name: str):
        """Yields a :class:`HookedLayer` for each module owning trainable parameters."""
        own = trainable_own_parameters(module)
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
            yield from self._discover_layers(child, f"{name}.{child_name}" if name else child_name)

    def _check_no_shared_parameters(self) -> None:
        owner: Dict[int, str] = {}
        for layer in self.layers:
            for p in layer.params:
                if id(p) in owner:
                    raise NotImplementedError(
                        f"Layers '{owner[id(p)]}' and '{layer.name}' share a parameter (weight tying). The per-sample "
                        "norm of a shared parameter needs the cross term of both uses, which FlashNorm's clipping "
                        "modes do not compute. Fix: untie the weights (e.g. tie_word_embeddings=False) or use "
                        "grad_sample_mode='hooks'."
                    )
                owner[id(p)] = layer.name

    # -- hooks ---------------------------------------------------------------------------------
    def add_hooks(self) -> None:
        for layer in self.layers:
            layer.capture = partial(self._capture_backward, layer)
        self._attach_forward_hooks()
        self.enable_hooks()

    def remove_hooks(self) -> None:
        self.disable_hooks()
        self._detach_forward_hooks()
        self._hooks_parked = False
        for layer in self.layers:
            layer.x, layer.kept = None, None

    def _attach_forward_hooks(self) -> None:
        for layer in self.layers:
            if layer.rule.autocast_input:
                layer.handles.append(layer.module.register_forward_pre_hook(self._cast_input_for_autocast))
            layer.handles.append(layer.module.register_forward_hook(partial(self._capture_forward, layer)))

    def _detach_forward_hooks(self) -> None:
        for layer in self.layers:
            while layer.handles:
                layer.handles.pop().remove()

    def _park_forward_hooks(self, parked: bool) -> None:
        """Detaches the layers' forward hooks for a step of one sample (``parked``), or re-attaches them.

        Such a step captures nothing, and a module without hooks runs PyTorch's fast call path: ~5-9 µs less
        host time per hooked layer and step (GPT-2 small: 76 layers).
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

    def forward(self, *args, **kwargs):
        if self._capturing_forward():
            self._step += 1  # a forward that captures starts a new step (eval / no_grad ones leave it be)
            leading = self._leading_batch_size(args)
            # The first argument's batch size speaks for the layers' once a step with hooks saw them agree.
            trusted = leading is not None and leading == self._last_leading_batch_size == self._batch_size
            self._reset_step()
            self._last_leading_batch_size = leading
            single = trusted and leading == 1 and self.single_sample_shortcut and not self._distributed
            if single:
                self._batch_size = 1  # what the layers' hooks would have found (the loss is checked against it)
            self._park_forward_hooks(single)
        return self._module(*args, **kwargs)

    def _reset_step(self) -> None:
        self._batch_size = None
        self._arena = None
        for layer in self.layers:
            layer.x, layer.kept = None, None

    def _anchor_on(self, device: torch.device) -> torch.Tensor:
        anchor = self._anchors.get(device)
        if anchor is None:
            anchor = self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return anchor

    def _batch_first(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.batch_first else t.movedim(1, 0)

    def _leading_batch_size(self, inputs) -> Optional[int]:
        """The batch dimension of the first input when it is a tensor, else None."""
        first = inputs[0] if inputs else None
        dim = 0 if self.batch_first else 1
        return first.shape[dim] if isinstance(first, torch.Tensor) and first.dim() > dim else None

    def _holds_one_sample(self, inputs) -> bool:
        """The layer's first input is a tensor whose batch dimension is 1."""
        return self._leading_batch_size(inputs) == 1

    def _cast_input_for_autocast(self, module: nn.Module, inputs):
        """Forward pre-hook of the layers whose rule keeps X in autocast's lower precision
        (``rule.autocast_input``): the layer gets its first input already cast, so its own autocast cast
        is a no-op and the X captured after it is the very tensor autograd saves for the backward — one
        cast and one copy of X, not two."""
        if not inputs or not self._capturing_forward():
            return None
        dtype = _autocast_target(inputs[0])
        return None if dtype is None else (inputs[0].to(dtype), *inputs[1:])

    def _capture_forward(self, layer: HookedLayer, module: nn.Module, inputs, output):
        if not self._capturing_forward():
            return None
        if self._single_sample_step() and self._holds_one_sample(inputs):
            return None  # B = 1, known from an earlier layer: nothing to capture (the fast path of every hook)
        if layer.x is not None:
            raise NotImplementedError(
                f"Layer '{layer.name}' ran twice in one forward pass. Per-sample norms of a layer applied more "
                "than once need cross terms between its uses, which FlashNorm's clipping modes do not compute. "
                "Fix: use a separate layer per use, or grad_sample_mode='hooks'."
            )
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
        layer.x = x
        shape = output.shape if self.batch_first else (output.shape[1], output.shape[0], *output.shape[2:])
        layer.out_meta = (shape, output.dtype)
        if not self._uses_checked:
            layer.graph_ends = (output.grad_fn, getattr(inputs[0], "grad_fn", None))
        return _Anchor.apply(output, self._anchor_on(output.device), layer.capture, self._step)

    def _capture_backward(self, layer: HookedLayer, grad_output: torch.Tensor, step: int) -> None:
        if not self._capturing:
            return
        if step != self._step or layer.x is None:
            # Never skip a layer: a missing norm term would under-clip and break the guarantee.
            raise RuntimeError(
                f"Layer '{layer.name}' is back-propagated from a forward pass other than the model's last one "
                "(or its input was not captured). Run the forward and the DP loss's backward in pairs: "
                "loss = criterion(model(x), y); loss.backward()."
            )
        x, layer.x = layer.x, None
        g = self._batch_first(grad_output.detach())
        if x.shape[0] == 0:
            return
        method = self._method(layer, x, g.shape, g.dtype, g)
        if method == "per_sample":
            kept = self._per_sample(layer, x, g)
        else:
            with_vectors = not self._vectors_to_arena(layer, x, g)
            self._norm_terms.append(layer.rule.norm_sq(layer.module, x, g, method, vectors=with_vectors))
            kept = (method, x, g, with_vectors)
        if self.passes == 1:
            layer.kept = kept

    def _method(self, layer: HookedLayer, x: torch.Tensor, g_shape, g_dtype, g: Optional[torch.Tensor] = None) -> str:
        """The layer's norm method for these shapes (planned once per new shape; ``g`` may be absent)."""
        key = (x.shape, g_shape, g_dtype, self._forced_method)
        if layer.plan is None or layer.plan[0] != key:
            if g is None:
                g = torch.empty(g_shape, dtype=g_dtype, device="meta")
            method = choose(
                layer.rule, layer.module, x, g, base=self.base_method, fused=self.passes == 1,
                override=self.norm_method, name=layer.name,
            )
            layer.plan = (key, method)
        return layer.plan[1]

    def _per_sample(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor) -> tuple:
        """The layer's per-sample gradients, in the arena where it has room; their norms go to the terms.

        Returns what the one-pass assembly keeps: ("arena", grads) or ("per_sample", grads).
        """
        arena = self._arena
        slots = {p: slot for p in layer.params if (slot := arena.slot(p)) is not None} if arena is not None else {}
        # (a slot's buffer is allocated here, when the pass first reaches it)
        grads = layer.rule.per_sample_grads(layer.module, x, g, out=slots or None)
        separate = {}
        for p, gs in grads.items():
            slot = slots.get(p)
            if slot is None or not arena.store(p, gs):
                separate[p] = gs
        if separate:  # norms squared and summed once, after the pass; the rest is in the arena's norms
            self._norm_roots.extend(per_sample_norms(separate))
            return ("per_sample", separate)
        return ("arena", grads)

    def _vectors_to_arena(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor) -> bool:
        """Writes the layer's vector parameters' per-sample gradients into their arena slots (the rest of
        the layer takes a norm kernel); ``False`` when they have no room there (the rule then counts them)."""
        slots = {p: self._arena.slot(p) for p in layer.vectors} if self._arena is not None else {}
        if not slots or any(slot is None for slot in slots.values()):
            return False
        for p, gs in layer.rule.vector_grads(layer.module, x, g, out=slots).items():
            self._arena.store(p, gs)
        return True

    def _plan_arena(self, batch: int, device: torch.device) -> Optional[PerSampleArena]:
        """Before the norm pass: room for the per-sample gradients of every layer planned ``per_sample``,
        and for the vector parameters (biases) of the other layers, in float32 (float64 for float64
        inputs), in the order the pass reaches them (last layer first). Two-pass modes, which need the
        per-sample gradients for their norms alone, keep only vector parameters (at most one dimension)
        there: a matrix's per-sample gradients stay per layer and are freed as soon as they are counted."""
        arena = None
        for layer in reversed(self.layers):
            x = layer.x
            if x is None or x.shape[0] == 0 or layer.out_meta is None:
                continue
            shape, dtype = layer.out_meta
            if self._method(layer, x, shape, dtype) == "per_sample":
                params, slot_dtype = layer.params, layer.rule.per_sample_dtype(layer.module, x.dtype, dtype)
                if self.passes == 2:
                    params = [p for p in params if p.dim() <= 1]
            else:
                params, slot_dtype = layer.vectors, accumulation_dtype_of(x.dtype, dtype)
            if slot_dtype is None or not params:
                continue
            arena = arena or PerSampleArena(batch, device)
            for p in params:
                arena.reserve(p, slot_dtype)
        return arena

    # -- the clipping workflow -------------------------------------------------------------------
    #: A batch of one sample takes one ordinary backward in every mode (see :meth:`_single_sample_step`):
    #: there is nothing per sample to separate, so two passes (or kept X and G) would buy nothing.
    single_sample_shortcut = True

    def _single_sample_step(self) -> bool:
        """True when this step's batch holds one sample and the shortcut applies.

        With B = 1 the batch gradient *is* the per-sample gradient: one ordinary backward, then
        c = min(1, C/(‖g‖ + 1e-6)) from the gradients themselves, scaled in place. Not under
        DDP/FSDP, whose reducers would average unclipped gradients during that backward.
        """
        return self.single_sample_shortcut and self._batch_size == 1 and not self._distributed

    def clipped_backward(self, loss_per_sample: torch.Tensor, zero_grad=None) -> None:
        """The whole clipping workflow: leaves Σ_b c_b ∇ℓ_b in ``p.grad`` of every trainable parameter.

        Args:
            loss_per_sample: per-sample losses ℓ: [B], from this module's last forward.
            zero_grad: called as ``zero_grad(set_to_none=True)`` after the loss is checked and before
                any gradient is written (the DP criterion passes ``optimizer.zero_grad``), so that
                autograd and the assembly store gradients instead of adding them to zeros.

        Raises:
            ValueError: a batch-size mismatch, before anything changes; a non-finite loss, after
                which every ``p.grad`` is ``None`` and no parameter has changed. The finiteness flag
                is copied to the host while the backward is issued (:class:`_FiniteCheck`) and read at
                its end, so the GPU never drains mid-step (under DDP/FSDP it is read first, before
                any collective).
        """
        capturing = loss_per_sample.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing and self._distributed:
            raise NotImplementedError(
                "CUDA-graph capture of a DDP/FSDP clipping step is not supported (its loss check and collectives "
                "need the host): run distributed steps eagerly."
            )
        self._check_loss(loss_per_sample, finite=self._distributed)
        finite = None if self._distributed else _FiniteCheck(loss_per_sample, capturing)
        self.captured_finite_check = finite if capturing else None
        if zero_grad is not None:
            zero_grad(set_to_none=True)
        try:
            with environment_read_once():
                self._clip(loss_per_sample)
            for p in self.trainable_parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if finite is not None and not capturing:
                self._check_finite(finite)
        except BaseException:
            for p in self.trainable_parameters:
                p.grad = None
            raise

    def _clip(self, loss_per_sample: torch.Tensor) -> None:
        """Σ_b c_b ∇ℓ_b into ``p.grad``: one ordinary backward for a single sample, else the norm pass and
        the mode's clipped gradients."""
        if self._single_sample_step():
            self._single_sample_backward(loss_per_sample)
        else:
            coef = self._norm_pass(loss_per_sample)
            self._write_clipped_gradients(loss_per_sample, coef)

    def compute_clipping_coef(self, loss_per_sample: torch.Tensor) -> torch.Tensor:
        """The norm pass alone: per-sample norms from every hooked layer → c: [B] (no gradient written)."""
        self._check_loss(loss_per_sample)
        with environment_read_once():
            return self._norm_pass(loss_per_sample)

    def write_clipped_gradients(self, loss_per_sample: torch.Tensor, coef: torch.Tensor) -> None:
        """After :meth:`compute_clipping_coef`: writes Σ_b c_b ∇ℓ_b into ``p.grad`` (zeros where unused)."""
        with environment_read_once():
            self._write_clipped_gradients(loss_per_sample, coef)
        for p in self.trainable_parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _norm_pass(self, loss_per_sample: torch.Tensor) -> torch.Tensor:
        if not self._uses_checked:
            self._check_parameter_uses(loss_per_sample.grad_fn)
        self._norm_terms, self._norm_roots = [], []  # per-layer terms, summed once after the pass
        self._forced_method = forced_method()  # (raises on a bad value before anything runs)
        if self.uses_arena:
            self._arena = self._plan_arena(loss_per_sample.shape[0], loss_per_sample.device)
        self._capturing = True
        try:
            torch.autograd.grad(
                loss_per_sample.sum(), list(self._anchors.values()), allow_unused=True, retain_graph=self.passes == 2
            )
        except BaseException:
            self._arena = None
            raise
        finally:
            self._capturing = False
            for layer in self.layers:
                layer.x = None
        if self._arena is not None:
            self._arena.finish()
            self._norm_roots.extend(self._arena.norms())
            if self.passes == 2:
                self._arena = None  # the second pass computes the clipped gradients itself
        terms, roots = self._norm_terms, self._norm_roots
        self._norm_terms, self._norm_roots = [], []
        acc = accumulation_dtype(*terms, *roots)
        norm_sq = torch.zeros(loss_per_sample.shape[0], dtype=acc, device=loss_per_sample.device)
        if terms:  # squared norms from the norm kernels, one [B] per layer (stack promotes to acc)
            norm_sq = norm_sq + torch.stack(terms).sum(dim=0)
        if roots:  # ‖per-sample gradient‖ per parameter
            norm_sq = norm_sq + torch.stack(roots).square().sum(dim=0)
        self.record_norm_sq(norm_sq)
        return self.get_clipping_coef()

    def _check_parameter_uses(self, root) -> None:
        """Raises if a parameter reaches the loss other than through its own layer's forward.

        Its gradient would then flow outside the anchors that measure norms (under-counting the norm
        in two passes, dropping that gradient in one pass). Counts, in the autograd graph of the first
        step, the edges into each parameter's gradient accumulator: over the whole graph, and inside
        each layer (from its output node down to its input's node, not crossing other anchors).
        """
        owned = {id(p): p for layer in self.layers for p in layer.params}

        def count_edges(start, stop=(), through_anchors=True):
            # A parameter's accumulator is recognised by its ``variable`` (not by the identity of Python
            # wrappers of graph nodes, which torch versions do not all keep stable); nodes are kept alive
            # in ``seen`` so that their ids stay unique during the walk.
            counts, seen, stack = {}, {}, [start] if start is not None else []
            while stack:
                node = stack.pop()
                for nxt, _ in node.next_functions:
                    if nxt is None:
                        continue
                    param = owned.get(id(getattr(nxt, "variable", None)))
                    if param is not None:
                        counts[param] = counts.get(param, 0) + 1
                    if id(nxt) in seen or any(nxt is s for s in stop):
                        continue
                    if through_anchors or not isinstance(nxt, _ANCHOR_NODE):
                        seen[id(nxt)] = nxt
                        stack.append(nxt)
            return counts

        total = count_edges(root)
        inside = {}
        for layer in self.layers:
            if layer.graph_ends is None:
                continue
            output_node, input_node = layer.graph_ends
            layer.graph_ends = None
            for p, n in count_edges(output_node, stop=(input_node,), through_anchors=False).items():
                inside[p] = inside.get(p, 0) + n
        self._uses_checked = True
        owner = {id(p): layer.name for layer in self.layers for p in layer.params}
        outside = [owner[id(p)] for p, n in total.items() if n > inside.get(p, 0)]
        if outside:
            raise NotImplementedError(
                f"A parameter of layer(s) {sorted(set(outside))} reaches the loss outside that layer's forward "
                "(e.g. F.linear(h, self.wte.weight) for a tied head). Its per-sample gradient would escape the "
                "norm: use the weight only through its module (an nn.Linear head, untied), or grad_sample_mode="
                "'hooks'."
            )

    def _single_sample_backward(self, loss_per_sample: torch.Tensor) -> None:
        torch.autograd.backward(loss_per_sample.sum())
        grads = [p.grad for p in self.trainable_parameters if p.grad is not None]
        if not grads:
            self.record_norm_sq(torch.zeros(1, dtype=accumulation_dtype(loss_per_sample), device=loss_per_sample.device))
            return
        # one multi-tensor pass for the norm (float32, float64 for float64) and one for the clipping, whose
        # coefficient is computed on the device from the norm
        self.record_norm_sq(multi_tensor.clip_by_total_norm_(grads, self.max_grad_norm))

    def _write_clipped_gradients(self, loss_per_sample: torch.Tensor, coef: torch.Tensor) -> None:
        raise NotImplementedError

    def _check_loss(self, loss_per_sample: torch.Tensor, finite: bool = True) -> None:
        """Raises (and forgets the step) unless the loss is [B] for this forward's B (and, with ``finite``,
        finite)."""
        if self._batch_size is None:
            raise RuntimeError(
                "No captured forward pass: run the wrapped model's forward in training mode (model.train(), "
                "grad enabled, hooks enabled) before calling backward on the loss."
            )
        if loss_per_sample.dim() != 1 or loss_per_sample.shape[0] != self._batch_size:
            self._reset_step()
            raise ValueError(
                f"The per-sample loss has shape {tuple(loss_per_sample.shape)} but the model's forward saw batch size "
                f"{self._batch_size}; the loss must hold one value per sample: [B]. For token-level losses call the "
                "criterion with shape=(B, T, V) so that the privacy unit is the sequence."
            )
        if finite:
            self._check_finite(_FiniteCheck(loss_per_sample))

    def _check_finite(self, finite: "_FiniteCheck") -> None:
        """Raises (and forgets the step) if the checked loss had a NaN or ±inf (waits for its flag)."""
        if not finite.result():
            self.reject_non_finite_step()

    def reject_non_finite_step(self) -> None:
        """Forgets the step, drops every gradient it wrote (``p.grad = None``) and raises ``ValueError``.

        Called when the loss was not finite: by the eager workflow, and by
        :class:`~flashnorm.cuda_graphs.CudaGraphStep` after a replay whose ``captured_finite_check`` fails.
        """
        self._reset_step()
        for p in self.trainable_parameters:
            p.grad = None
        raise ValueError(_NON_FINITE)

    # -- Opacus-compatible accessors -------------------------------------------------------------
    def record_norm_sq(self, norm_sq: torch.Tensor) -> None:
        """Records the step's squared per-sample gradient norms [B]; the norms follow from them when asked."""
        self._norm_sq = norm_sq
        self._per_sample_gradient_norms = None

    def get_norm_sample(self) -> torch.Tensor:
        """Per-sample gradient norms ‖g_b‖ of the last norm pass: [B]."""
        if self._norm_sq is None:
            raise AttributeError("No norms yet: call backward on the loss from the DP criterion first.")
        norms = self._norm_sq.sqrt()
        self.per_sample_gradient_norms = norms
        return norms

    def get_clipping_coef(self) -> torch.Tensor:
        """c_b = min(1, C / (‖g_b‖ + 1e-6)): [B]."""
        return multi_tensor.clipping_coef(self.get_norm_sample(), self.max_grad_norm)

    @property
    def per_sample_gradient_norms(self) -> torch.Tensor:
        """Per-sample gradient norms of the last step (not private: for debugging only)."""
        if self._per_sample_gradient_norms is None:
            if self._norm_sq is None:
                raise AttributeError("per_sample_gradient_norms is not set: run forward and backward first.")
            self.get_norm_sample()
        return self._per_sample_gradient_norms

    @per_sample_gradient_norms.setter
    def per_sample_gradient_norms(self, value: torch.Tensor) -> None:
        self._per_sample_gradient_norms = value
