"""The clipping workflow of FlashNorm's grad-sample modules (two passes and one pass).

The *norm pass* ``torch.autograd.grad(Σ_b ℓ_b, [tap])`` walks the whole graph down to the lowest gradient
tap (:mod:`~flashnorm.grad_sample.capture`), so every hooked layer sees its output gradient G, but autograd
computes no parameter gradient. It also names the parameters as inputs: inside their layers they are read through
aliases (:mod:`~flashnorm.grad_sample.aliases`), so a gradient there means a read outside its layer, and the step
refuses. In the tap's callback the layer's norm rule turns (X, G) into per-sample
squared norms, summed into ``norm_sq[b]``; then c_b = min(1, C / (‖g_b‖ + 1e-6)). Subclasses write
Σ_b c_b ∇ℓ_b into ``p.grad``: a second backward pass of Σ_b c_b ℓ_b
(:class:`~flashnorm.grad_sample.two_passes.GradSampleModuleFastGradientClipping`) or assembly from what the
norm pass kept (:class:`~flashnorm.grad_sample.one_pass.GradSampleModuleFastGradientClippingFuse`).

G is the gradient of the *sum* of per-sample losses whatever ``loss_reduction`` is; the reduction is applied
by the DP optimizer (division by the expected batch size for ``mean``), exactly as in Opacus.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.validators import ModuleValidator

from ..kernels import multi_tensor
from ..kernels.accumulation import accumulation_dtype
from ..kernels.backend import resolve_backend
from ..norms import rounding
from ..norms.planner import ALGORITHMS, resolve_norm_method
from ..utils.privacy_parameters import check_privacy_parameters
from .aliases import ParameterAliases, registrations
from .capture import CaptureHooks, HookedLayer, discover_layers
from .loss_check import FiniteLossCheck, LossChecks
from .norm_pass import NormPassHooks
from .packed_grads import PackedPerSampleGrads, plan_packed_grads
from .provenance import clipped_iterations, mark_clipped


def _is_distributed(module: nn.Module) -> bool:
    """True when gradients of ``module`` are reduced across ranks by DDP or FSDP2 hooks."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, DistributedDataParallel) or any(isinstance(m, FSDPModule) for m in module.modules())


class FlashNormGradSampleModule(CaptureHooks, NormPassHooks, LossChecks, AbstractGradSampleModule):
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
            layer's rule has it; ``"auto"`` lets the planner choose; ``None`` reads ``FLASHNORM_NORM_METHOD``
            (unset: ``"auto"``).
        norm_algorithm: the mode's algorithm (``"flash"``, ``"gram"``, ``"per_sample"``), as the mode table
            gives it; when set it replaces the two ``use_*_clipping`` flags (Opacus's spelling).
        backend: the kernels' backend, ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or
            ``"torch"``; ``None`` reads ``FLASHNORM_BACKEND`` (unset: ``"auto"``).
    """

    #: Backward passes per step: 2 (norm pass + clipped pass) or 1 (norm pass + assembly).
    passes = 2
    #: Per-sample gradients packed in :class:`PackedPerSampleGrads`: their norms take one reduction per
    #: buffer, and in one pass their clipped sums one GEMV. Two-pass modes pack only vector parameters
    #: (biases, normalisation weights: B × n elements each), for the norm pass alone.
    packs_per_sample_grads = True

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
        norm_algorithm: Optional[str] = None,
        backend: Optional[str] = None,
    ):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: only 'mean' and 'sum' are supported.")
        if not isinstance(max_grad_norm, (int, float)) or max_grad_norm <= 0:
            raise ValueError(
                f"max_grad_norm={max_grad_norm!r}: FlashNorm's clipping modes need one positive number "
                "(flat clipping); per-layer bounds need grad_sample_mode='hooks'."
            )
        if norm_algorithm is None:
            norm_algorithm = "flash" if use_flash_clipping else ("gram" if use_ghost_clipping else "per_sample")
        if norm_algorithm not in ALGORITHMS:
            raise ValueError(f"norm_algorithm={norm_algorithm!r} is not one of {', '.join(ALGORITHMS)}.")
        forced = resolve_norm_method(norm_method)
        backend = resolve_backend(backend)
        if strict:
            ModuleValidator.validate(m, strict=True)
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.max_grad_norm = float(max_grad_norm)
        self.norm_algorithm = norm_algorithm
        self.norm_method = forced  # None: planned per layer
        self.backend = backend
        self._all_parameters = list(m.parameters())
        self.trainable_parameters = [p for p in self._all_parameters if p.requires_grad]
        self._flags_at_discovery = self._trainable_flags()
        self._distributed = _is_distributed(m)
        self._discover()
        self._taps: Dict[torch.device, torch.Tensor] = {}
        self._capturing = False
        self._batch_size: Optional[int] = None
        self._step = 0  # counts capturing forward passes; taps remember theirs
        self._step_used = False  # this step's forward was back-propagated by the workflow already
        self._taps_reached = False  # the norm pass reached a gradient tap
        self._step_check: Optional[FiniteLossCheck] = None  # the losses (and norms) of the step in progress
        self._capturing_graph = False  # the step in progress is captured in a CUDA graph
        self._in_workflow = False  # inside clipped_backward (its second pass reaches the taps again)
        self._plain_backward = False  # a plain backward (not the workflow's) reached the taps this step
        self._forward_depth = 0  # inside the wrapper's capturing forward
        self._no_grad_layers = False  # a hooked layer ran under no_grad in a capturing forward (reentrant checkpoint)
        self._shared_inputs: Dict[HookedLayer, tuple] = {}  # (x, g) of layers sharing a parameter, this pass
        self._shared_grads: Dict[HookedLayer, dict] = {}  # or their per-sample gradients
        self._shared_scales: Dict[HookedLayer, tuple] = {}  # (s, γ) of their rounding (norms.rounding)
        self._norm_sq: Optional[torch.Tensor] = None
        self._norm_bound: Optional[torch.Tensor] = None  # U_b of norms.rounding, or None
        self._norm_terms: List[torch.Tensor] = []  # squared per-sample norms, one [B] per layer
        self._norm_roots: List[torch.Tensor] = []  # per-sample norms, one [B] per parameter
        self._radii: List[torch.Tensor] = []  # rounding radii r, one [B] per layer (norms.rounding)
        self._shared_radius: Optional[torch.Tensor] = None  # Σ of the radii of layers sharing a parameter
        self._slack_sq: List[torch.Tensor] = []  # squared-domain rounding allowances Q, one [B] per Gram / cross term
        self._packed: Optional[PackedPerSampleGrads] = None
        self._per_sample_gradient_norms: Optional[torch.Tensor] = None
        #: The loss check of a step captured in a CUDA graph (read after each replay), else None.
        self.captured_finite_check: Optional[FiniteLossCheck] = None
        self._hooks_parked = False  # forward hooks detached for steps of one sample (:meth:`_park_forward_hooks`)
        self._last_leading_batch_size: Optional[int] = None  # of the last capturing forward's first argument
        self.hooks_enabled = False
        self.add_hooks()

    def _discover(self) -> None:
        """The hooked layers, and the parameters two of them share (tied weights), with their layers.

        Raises:
            NotImplementedError: a shared parameter under FSDP2, whose one-pass reduction is per layer.
        """
        self.layers = list(discover_layers(self._module))
        users: Dict[int, list] = {}
        for layer in self.layers:
            for p in layer.params:
                users.setdefault(id(p), [p]).append(layer)
        self._shared_groups = [(found[0], found[1:]) for found in users.values() if len(found) > 2]
        for param, sharing in self._shared_groups:
            if self._distributed:
                raise NotImplementedError(
                    f"Layers {[layer.name for layer in sharing]} share a parameter (weight tying); FlashNorm computes "
                    "its cross terms on one device or under DDP, not yet under FSDP2. Fix: untie the weights or use "
                    "grad_sample_mode='hooks'."
                )
            for layer in sharing:
                layer.shared.append(param)
        self._hooked_params = list({id(p): p for layer in self.layers for p in layer.params}.values())
        self._aliases = ParameterAliases({
            layer: registrations(list(layer.module.modules()) if layer.rule.covers_children else [layer.module],
                                 layer.params)
            for layer in self.layers
        }, counterpart=self._parameter_counterpart)  # fmt: skip

    def forward(self, *args, **kwargs):
        if not self._capturing_forward():
            try:
                return self._module(*args, **kwargs)
            finally:
                self._aliases.leave_all()  # (a layer whose forward raised)
        self._step += 1  # a forward that captures starts a new step (eval / no_grad ones leave it be)
        self._step_used = False
        self._follow_requires_grad()
        leading = self._leading_batch_size(args)
        # The first argument's batch size speaks for the layers' once a step with hooks saw them agree.
        trusted = leading is not None and leading == self._last_leading_batch_size == self._batch_size
        self._reset_step()
        self._last_leading_batch_size = leading
        single = trusted and leading == 1 and not self._distributed
        if single:
            self._batch_size = 1  # what the layers' hooks would have found (the loss is checked against it)
        self._park_forward_hooks(single)
        self._forward_depth += 1
        try:
            # A non-reentrant checkpointed region must be recomputed to its end: its layers' inputs are captured
            # there (early stop would skip the layers after the last tensor autograd itself needs).
            with checkpoint.set_checkpoint_early_stop(False):
                return self._module(*args, **kwargs)
        finally:
            self._forward_depth -= 1
            self._aliases.leave_all()  # (a layer whose forward raised)

    def _follow_requires_grad(self) -> None:
        """Re-discovers the hooked layers when ``requires_grad`` changed since the last step (progressive
        unfreezing): a newly trainable layer gets hooks, a frozen one loses them, on every path (B = 1 too).

        Raises:
            RuntimeError: under DDP/FSDP, whose gradient reduction was laid out for the original parameters.
        """
        if self._trainable_flags() == self._flags_at_discovery:
            return
        trainable = [p for p in self._all_parameters if p.requires_grad]
        if self._distributed:
            raise RuntimeError(
                "requires_grad changed after make_private on a DDP/FSDP model; freeze or unfreeze parameters "
                "before wrapping it (call make_private again with the new set)."
            )
        self.remove_hooks()
        self.trainable_parameters = trainable
        self._flags_at_discovery = self._trainable_flags()
        self._discover()
        self._batch_size = self._last_leading_batch_size = None
        self.add_hooks()

    def _trainable_flags(self) -> tuple:
        """``requires_grad`` of every parameter of the wrapped module, in order."""
        return tuple(p.requires_grad for p in self._all_parameters)

    def _reset_step(self) -> None:
        self._batch_size = None
        self._plain_backward = self._no_grad_layers = False
        self._norm_terms, self._norm_roots, self._radii, self._slack_sq = [], [], [], []
        self._shared_inputs, self._shared_grads, self._shared_scales = {}, {}, {}
        self._shared_radius = None
        self._packed = None
        for layer in self.layers:
            layer.forget()

    # -- the clipping workflow -------------------------------------------------------------------
    def _single_sample_step(self) -> bool:
        """True when this step's batch holds one sample and the shortcut applies.

        With B = 1 the batch gradient *is* the per-sample gradient: one ordinary backward, then
        c = min(1, C/(‖g‖ + 1e-6)) from the gradients themselves, scaled in place. Not under
        DDP/FSDP, whose reducers would average unclipped gradients during that backward.
        """
        return self._batch_size == 1 and not self._distributed

    def clipped_backward(self, loss_per_sample: torch.Tensor, zero_grad=None, max_grad_norm=None) -> None:
        """The whole clipping workflow: adds Σ_b c_b ∇ℓ_b to ``p.grad`` of every trainable parameter.

        Gradients that an earlier clipping step left for the optimizer (k backward passes before one
        ``step()``: gradient accumulation) are kept and summed with this one; the optimizer then divides by
        k × the expected batch size and tells the accountant k × the sample rate, as Opacus's hooks mode
        does. Any other gradient in ``p.grad`` (a plain backward's, one already used by a step) is discarded.

        Args:
            loss_per_sample: per-sample losses ℓ: [B], from this module's last forward.
            zero_grad: called as ``zero_grad(set_to_none=True)`` to discard gradients the workflow did not write
                (the DP criterion passes ``optimizer.zero_grad``).
            max_grad_norm: the bound C of this step, when the DP optimizer's differs from the module's (Opacus's
                clipping schedulers change the optimizer's): the noise σ·C is added for that C, so it clips to it.

        Raises:
            RuntimeError: no training forward captured this step (eval mode, hooks disabled, or the step's
                forward was already used by a backward), before anything changes.
            ValueError: a batch-size mismatch, before anything changes; a non-finite loss, after which the
                gradients are as they were before the call and no parameter has changed. The finiteness flag
                is copied to the host while the backward is issued (:class:`FiniteLossCheck`) and read at its
                end, so the GPU never drains mid-step (under DDP/FSDP it is read first, before any collective).
        """
        capturing = loss_per_sample.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing and self._distributed:
            raise NotImplementedError(
                "CUDA-graph capture of a DDP/FSDP clipping step is not supported (its loss check and collectives "
                "need the host): run distributed steps eagerly."
            )
        if max_grad_norm is not None and max_grad_norm != self.max_grad_norm:
            check_privacy_parameters(0.0, max_grad_norm)
            self.max_grad_norm = float(max_grad_norm)
        self._check_loss(loss_per_sample, finite=self._distributed)
        self._check_trainable_unchanged()
        self._capturing_graph = capturing
        self._step_check = None
        params = self.trainable_parameters
        prior, iterations = (None, 0) if capturing else self._take_pending_clipped_sum()
        if prior is None and zero_grad is not None:
            zero_grad(set_to_none=True)
        self._in_workflow = True
        try:
            self._clip(loss_per_sample)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.captured_finite_check = self._step_check if capturing else None
            if self._step_check is not None and not capturing:
                self._check_finite(self._step_check)
        except BaseException:
            for i, p in enumerate(params):
                p.grad = None if prior is None else prior[i]
            raise
        finally:
            self._in_workflow = False
            self._step_used = True
        if prior is not None:
            for p, earlier in zip(params, prior):
                if earlier is not None:  # (None: frozen during the earlier micro-batches)
                    p.grad.add_(earlier)
        mark_clipped(params, iterations + 1)

    def _take_pending_clipped_sum(self):
        """``(gradients, k)`` when every ``p.grad`` is a clipped sum of k earlier clipping steps still waiting
        for its optimizer step (taken out of ``p.grad``), else ``(None, 0)``."""
        params = self.trainable_parameters
        counts = {clipped_iterations(p) for p in params if p.grad is not None}
        if len(counts) != 1 or None in counts:
            return None, 0
        prior = [p.grad for p in params]
        for p in params:
            p.grad = None
        return prior, counts.pop()

    def _check_trainable_unchanged(self) -> None:
        """Raises (before anything changes) when ``requires_grad`` changed since this step's forward."""
        if self._trainable_flags() != self._flags_at_discovery:
            self._reset_step()
            raise RuntimeError(
                "requires_grad changed between the forward pass and the backward pass; change it between steps "
                "(the next forward picks it up)."
            )

    def _clip(self, loss_per_sample: torch.Tensor) -> None:
        """Σ_b c_b ∇ℓ_b into ``p.grad``: one ordinary backward for a single sample, else the norm pass and
        the mode's clipped gradients."""
        if self._single_sample_step():
            if not self._distributed:
                self._step_check = FiniteLossCheck(loss_per_sample, self._capturing_graph)
            self._single_sample_backward(loss_per_sample)
        else:
            coef = self._norm_pass(loss_per_sample)
            self._write_clipped_gradients(loss_per_sample, coef)

    def compute_clipping_coef(self, loss_per_sample: torch.Tensor) -> torch.Tensor:
        """The norm pass alone: per-sample norms from every hooked layer → c: [B] (no gradient written)."""
        self._check_loss(loss_per_sample)
        return self._norm_pass(loss_per_sample)

    def write_clipped_gradients(self, loss_per_sample: torch.Tensor, coef: torch.Tensor) -> None:
        """After :meth:`compute_clipping_coef`: writes Σ_b c_b ∇ℓ_b into ``p.grad`` (zeros where unused)."""
        self._write_clipped_gradients(loss_per_sample, coef)
        for p in self.trainable_parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _norm_pass(self, loss_per_sample: torch.Tensor) -> torch.Tensor:
        # per-layer terms and rounding allowances, summed once after the pass
        self._norm_terms, self._norm_roots, self._radii, self._slack_sq = [], [], [], []
        self._shared_radius = None
        if self.packs_per_sample_grads:
            self._packed = plan_packed_grads(
                self.layers, loss_per_sample.shape[0], loss_per_sample.device, self._method, two_passes=self.passes == 2
            )
        self._capturing = True
        try:
            self._taps_reached = False
            outside: List[nn.Parameter] = []
            if self._no_grad_layers:
                outside = self._full_norm_pass(loss_per_sample)
            else:
                taps = list(self._taps.values())
                # the parameters too: with the aliases, a gradient there comes from a use outside its layer
                params = [self._aliases.original(p) for p in self._hooked_params]
                grads = torch.autograd.grad(
                    loss_per_sample.sum(), taps + params, allow_unused=True, retain_graph=self.passes == 2
                )
                outside = [p for p, grad in zip(params, grads[len(taps):]) if grad is not None]
            if self._taps and not self._taps_reached:
                # The loss reaches no gradient tap: it was built from a forward that captured nothing (eval mode,
                # hooks disabled) while a training forward's captures wait unused; its norms would read 0.
                raise RuntimeError(
                    "No captured forward pass for this loss: the loss does not come from the wrapped model's last "
                    "training forward (a forward in eval mode or with hooks disabled captures nothing). Run the "
                    "forward in training mode (model.train(), hooks enabled) before each backward on the DP loss."
                )
            self._refuse_outside_uses(outside)
            self._finish_pass()
        except BaseException:
            self._packed = None
            raise
        finally:
            self._capturing = False
            for layer in self.layers:
                layer.xs, layer.gs, layer.arrived = [], [], 0
        if self._packed is not None:
            self._packed.finish()
            self._norm_roots.extend(self._packed.norms())
            if self.passes == 2:
                self._packed = None  # the second pass computes the clipped gradients itself
        norm_sq = self._summed_norm_sq(loss_per_sample.shape[0], loss_per_sample.device)
        bound = self._rounding_bound(norm_sq)
        self.record_norm_sq(norm_sq, bound)
        if not self._distributed:  # (DDP/FSDP checked the loss before any collective; norms are rank-local)
            # One check, read after the rest of the step is issued: every loss finite, every norm estimate finite
            # and ≥ 0 or, where it cancelled below 0, its rounding bound finite. A NaN norm would give c = NaN
            # and poison the other samples' gradients.
            valid = norm_sq if bound is None else norm_sq.clamp(min=0) + bound
            valid = torch.where(valid >= 0, valid, torch.full_like(valid, float("nan")))
            self._step_check = FiniteLossCheck(torch.cat([loss_per_sample.detach().to(norm_sq.dtype), valid]),
                                               self._capturing_graph)
        return self.get_clipping_coef()

    def _full_norm_pass(self, loss_per_sample: torch.Tensor) -> List[nn.Parameter]:
        """The norm pass as an ordinary backward, for layers captured only when reentrant activation checkpointing
        recomputes them (``torch.utils.checkpoint`` refuses ``autograd.grad``): the parameter gradients it also
        computes are unclipped and discarded (those of the aliases are dropped as they arrive, so a gradient
        left on a hooked parameter comes from a use outside its layer: those parameters are returned)."""
        params = self.trainable_parameters
        prior = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with self._aliases.dropping_gradients():
                torch.autograd.backward(loss_per_sample.sum(), retain_graph=self.passes == 2)
            return [p for p in self._hooked_params if p.grad is not None or self._aliases.original(p).grad is not None]
        finally:
            for p, grad in zip(params, prior):
                p.grad = grad
            for tap in self._taps.values():
                tap.grad = None

    def _parameter_counterpart(self, p: nn.Parameter) -> Optional[nn.Parameter]:
        """The tensor that stands for ``p`` in its registrations while its layer runs, if not ``p`` (FSDP2)."""
        return None

    def _refuse_outside_uses(self, params: List[nn.Parameter]) -> None:
        """Raises when any of ``params`` (hooked parameters) received gradient from a use outside its layer."""
        if params:
            found = {id(p) for p in params}
            names = sorted({layer.name for layer in self.layers for p in layer.params if id(p) in found})
            raise NotImplementedError(
                f"A parameter of layer(s) {names} reaches the loss outside that layer's forward "
                "(e.g. F.linear(h, self.wte.weight) for a tied head). Its per-sample gradient would escape the "
                "norm: use the weight only through its module (an nn.Linear head, or tie it through two modules), "
                "or grad_sample_mode='hooks'."
            )

    def _single_sample_backward(self, loss_per_sample: torch.Tensor) -> None:
        torch.autograd.backward(loss_per_sample.sum())
        grads = [p.grad for p in self.trainable_parameters if p.grad is not None]
        if not grads:
            self.record_norm_sq(torch.zeros(1, dtype=accumulation_dtype(loss_per_sample), device=loss_per_sample.device))
            return
        # one multi-tensor pass for the norm (float32, float64 for float64) and one for the clipping, whose
        # coefficient is computed on the device from the norm
        norm_sq = multi_tensor.squared_norm(grads, backend=self.backend)
        multi_tensor.scale_(grads, rounding.clipping_coef(norm_sq, None, self.max_grad_norm), backend=self.backend)
        self.record_norm_sq(norm_sq)

    def _write_clipped_gradients(self, loss_per_sample: torch.Tensor, coef: torch.Tensor) -> None:
        raise NotImplementedError
