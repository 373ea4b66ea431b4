"""FlashNorm's grad-sample module: configuration, the layers' hooks, and the clipping workflow's call chain.

A training forward starts a `ClippingStep`; the layers' hooks record into it
(`hooks`). The DP loss's ``backward()`` calls `FlashNormGradSampleModule.clipped_backward`,
whose phases read in one place:

1. **checks**: the loss belongs to this step's forward ([B]) and, under DDP/FSDP, is finite;
2. **norm pass** (`norm_pass`): ``torch.autograd.grad(Σ_b ℓ_b, taps)`` walks the graph
   to the gradient taps; each hooked layer's rule turns (X, G) into per-sample squared norms; no parameter
   gradient is computed;
3. **coefficients**: c_b = min(1, C/(‖g_b‖ + 10⁻⁶), (1 + τ)C/U_b) (`flashnorm.norms.rounding.clipping_coef`);
4. **write**: the mode's writer (`writers`) adds Σ_b c_b ∇ℓ_b into ``p.grad``: a
   second backward of Σ_b c_b ℓ_b, or assembly from what the norm pass kept;
5. **mark**: the gradients are recorded as clipped for the DP optimizer (`provenance`).

A batch of one sample takes one ordinary backward instead (its gradient is the per-sample gradient). G is the
gradient of the *sum* of per-sample losses whatever ``loss_reduction`` is; the DP optimizer applies the reduction
(division by the expected batch size for ``mean``), exactly as in Opacus.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.validators import ModuleValidator

from ..kernels.backend import resolve_backend
from ..norms.planner import ALGORITHMS, resolve_norm_method
from ..parallelism import parallelism_of, reduces_in_backward
from ..utils.privacy_parameters import PrivacyParameters, privacy_attribute
from .capture import HookedModel, hook_model, refuse_parameter_hooks, scale_rows
from .config import StepConfig
from .hooks import LayerHooks
from .independence import IndependenceProbe, LayerChecks
from .loss_check import NON_FINITE_LOSS, FiniteLossCheck
from .phases import CHECKS, CLIPPED_BACKWARD, COEFFICIENTS, NORM_PASS, SINGLE_SAMPLE, WRITE, phase
from .provenance import mark_clipped, take_pending_clipped_sum
from .step import ClippingStep, NormRecord, one_per_sample
from .writers import ClippedGradientWriter, SecondBackward


class FlashNormGradSampleModule(AbstractGradSampleModule):
    """Wraps a module for FlashNorm's clipping workflow; see the module docstring.

    Args:
        m: the module to wrap; its parameters stay the same ``Parameter`` objects.
        batch_first: inputs are ``[B, ...]`` (else ``[T, B, ...]``).
        loss_reduction: ``"mean"`` or ``"sum"`` (applied by the optimizer, as in Opacus).
        max_grad_norm: the clipping bound C (until a DP criterion shares its optimizer's
            `PrivacyParameters` with the module).
        use_flash_clipping: flash norms, the planner choosing per layer (default).
        use_ghost_clipping: with ``use_flash_clipping=False``, Gram (ghost) norms; both ``False`` gives
            per-sample-gradient norms.
        strict: validate the module with Opacus's ``ModuleValidator`` (e.g. no BatchNorm).
        norm_method: force one method (``"flash"``, ``"gram"``, ``"per_sample"``) where a layer's rule has it;
            ``"auto"`` lets the planner choose; ``None`` reads ``FLASHNORM_NORM_METHOD`` (unset: ``"auto"``).
        norm_algorithm: the mode's algorithm (``"flash"``, ``"gram"``, ``"per_sample"``), as the mode table gives
            it; when set it replaces the two ``use_*_clipping`` flags (Opacus's spelling).
        backend: the kernels' backend, ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or
            ``"torch"``; ``None`` reads ``FLASHNORM_BACKEND`` (unset: ``"auto"``).
        writer: how the clipped gradients are written (`writers`); default: the
            class's ``writer_class``.
        per_parameter_norms: also set Opacus's per-parameter norms ``p._norm_sample`` after each clipped backward
            (see `per_parameter_norms`); a plain backward always sets them.
    """

    #: The writer of the class's mode when none is given.
    writer_class: type = SecondBackward
    #: Per-sample gradients packed in `PackedPerSampleGrads` (FSDP2 says no).
    packs_per_sample_grads = True
    #: Norms can be split by parameter, keyed by the module's own parameters (FSDP2 says no: its rules see the
    #: unsharded ones).
    splits_norms = True

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
        writer: Optional[ClippedGradientWriter] = None,
        per_parameter_norms: bool = False,
    ):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: only 'mean' and 'sum' are supported.")
        privacy = PrivacyParameters(0.0, max_grad_norm)
        if norm_algorithm is None:
            norm_algorithm = "flash" if use_flash_clipping else ("gram" if use_ghost_clipping else "per_sample")
        if norm_algorithm not in ALGORITHMS:
            raise ValueError(f"norm_algorithm={norm_algorithm!r} is not one of {', '.join(ALGORITHMS)}.")
        forced = resolve_norm_method(norm_method)
        backend = resolve_backend(backend)
        # Samples stay independent (independence.py): refused layers, checked now and at every forward.
        layer_checks = LayerChecks(m)
        layer_checks.check()
        if strict:
            ModuleValidator.validate(m, strict=True)
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        #: σ and C; a DP criterion replaces it with its optimizer's (`share_privacy_parameters`).
        self.privacy = privacy
        self.layer_checks = layer_checks
        self.norm_algorithm = norm_algorithm
        self.norm_method = forced  # None: planned per layer
        self.backend = backend
        self.parallelism = parallelism_of(m)
        self.distributed = reduces_in_backward(self.parallelism)
        #: The sample-independence probe still has to run (the first capturing forward with B ≥ 2).
        self.probe_pending = True
        self.config = StepConfig(
            backend, norm_algorithm, forced, writer or self.writer_class(), batch_first=batch_first,
            distributed=self.distributed, one_sample_shortcut=self.parallelism != "fsdp",
            packs_per_sample_grads=self.packs_per_sample_grads,
            splits_norms=self.splits_norms,
        )
        self._parameter_names = {id(p): name for name, p in m.named_parameters()}
        self._all_parameters = list(m.parameters())
        self.trainable_parameters = [p for p in self._all_parameters if p.requires_grad]
        self._flags_at_discovery = self._trainable_flags()
        self.hooked: HookedModel = self._hook_model()
        #: The step in progress: made by a training forward, dropped once its gradients are written.
        self.step: Optional[ClippingStep] = None
        self._steps_started = 0
        self._last_sizes: Optional[tuple] = None  # (first argument's, layers') batch sizes of the last finished step
        #: The norms of the last step (or plain backward) and their rounding bound.
        self.last_norms: Optional[NormRecord] = None
        self._per_sample_gradient_norms: Optional[torch.Tensor] = None
        self._norm_samples_set = False  # some p._norm_sample holds the norms of an earlier backward
        self.per_parameter_norms = per_parameter_norms
        #: The loss check of a step captured in a CUDA graph (read after each replay), else None.
        self.captured_finite_check: Optional[FiniteLossCheck] = None
        self.hooks = LayerHooks(self)
        self.hooks_enabled = False
        self.add_hooks()

    max_grad_norm = privacy_attribute("max_grad_norm", "C, as the privacy parameters' owner holds it.")

    @property
    def per_parameter_norms(self) -> bool:
        """Whether a clipped backward (the DP loss's) also sets Opacus's per-parameter norms: after it, every
        trainable ``p._norm_sample`` is ‖∇_p ℓ_b‖: [B] (float32, float64 for float64), as Opacus's
        ``GradSampleModuleFastGradientClipping`` leaves them; their norm over the parameters is
        `get_norm_sample`.

        Off by default: the norm rules fuse a layer's parameters (a Linear's weight and bias are one term; per-sample
        gradients packed side by side are one norm per buffer), and splitting them costs launches and, for layers
        with several parameters and no split of their own, per-sample gradients. A plain backward (not a DP step)
        always sets them; with this off, a clipped backward removes those of an earlier one. Not under FSDP2.
        """
        return self._per_parameter_norms

    @per_parameter_norms.setter
    def per_parameter_norms(self, value: bool) -> None:
        if value and not self.splits_norms:
            raise NotImplementedError(
                f"{type(self).__name__}: per-parameter norms (p._norm_sample) are not available under FSDP2; "
                "get_norm_sample() gives the per-sample norms."
            )
        self._per_parameter_norms = bool(value)

    def share_privacy_parameters(self, privacy: PrivacyParameters) -> None:
        """Clips with ``privacy``'s C from now on (the DP optimizer's, which sizes the noise for it)."""
        self.privacy = privacy

    @property
    def layers(self):
        """The hooked layers (`HookedLayer`)."""
        return self.hooked.layers

    @property
    def taps(self):
        """The gradient taps made so far, one per device (none while no step captured anything)."""
        return self.hooked.taps

    def _hook_model(self) -> HookedModel:
        hooked = hook_model(self._module, shared_allowed=self.parallelism != "fsdp", batch_first=self.batch_first,
                            counterpart=self._parameter_counterpart)
        self.config.writer.bind(hooked.layers)
        return hooked

    def _parameter_counterpart(self, p: nn.Parameter) -> Optional[nn.Parameter]:
        """The tensor that stands for ``p`` in its registrations while its layer runs, if not ``p`` (FSDP2)."""
        return None

    # -- hooks --------------------------------------------------------------------------------------
    def add_hooks(self) -> None:
        self.hooks.attach()
        self.enable_hooks()

    def remove_hooks(self) -> None:
        self.disable_hooks()
        self.hooks.detach()
        self.step = None

    def enable_hooks(self) -> None:
        """Turns capture back on (after `disable_hooks`)."""
        self.hooks_enabled = True

    def disable_hooks(self) -> None:
        """Turns capture off: the module then trains like the plain module."""
        self.hooks_enabled = False

    def capturing_forward(self) -> bool:
        """Whether a forward now captures: hooks on, the wrapper in training mode (its mode decides, not a
        layer's: a trainable layer left in eval mode inside a training forward still gets gradients, so its norm
        must be counted) and grad enabled."""
        return self.hooks_enabled and self.training and torch.is_grad_enabled()

    # -- the forward ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self.layer_checks.check()  # a BatchNorm switched to train() since make_private, before anything runs
        if not self.capturing_forward():
            try:
                return self._module(*args, **kwargs)
            finally:
                self.hooked.aliases.leave_all()  # (a layer whose forward raised)
        self._follow_requires_grad()
        leading = self.hooks.call_batch_size(args, kwargs)
        last = (self.step.leading_batch_size, self.step.batch_size) if self.step is not None else self._last_sizes
        # The call's batch size speaks for the layers' once a step with hooks saw them agree.
        single = last is not None and leading == last[0] == last[1] == 1 and self.config.one_sample_shortcut
        probe = self._probe_independence(leading, args, kwargs)
        self.step = self._start_step(leading, 1 if single else None)
        self.hooks.park(single)
        if single:  # (the layers' pre-hooks, which check their parameters, are detached)
            self.hooked.aliases.check_registrations()
        # A non-reentrant checkpointed region must be recomputed to its end when its layers' inputs are captured
        # there (early stop would skip the layers after the last tensor autograd itself needs); one sample captures
        # nothing, and its recompute stops where autograd's does (a region's last GEMM is not run twice).
        recompute_whole = contextlib.nullcontext() if single else checkpoint.set_checkpoint_early_stop(False)
        with self.hooks.in_forward(), recompute_whole:
            output = self._module(*args, **kwargs)
        if probe is not None:
            probe.compare(output)
            self.probe_pending = False
        step = self.step
        if self.config.writer.scales_outputs and step.batch_size is not None and not step.single_sample:
            output = scale_rows(output, step.output_scale, 0 if self.batch_first else 1, step.batch_size,
                                step.last_layer_output)
            step.last_layer_output = None
        return output

    def _probe_independence(self, leading: Optional[int], args, kwargs) -> Optional[IndependenceProbe]:
        """The sample-independence probe's perturbed forward (`independence`), once, with capture off (the
        caller compares the real forward's output with it); not under FSDP2, whose forward has collectives."""
        if not self.probe_pending or self.parallelism == "fsdp":
            return None
        target = self._module.module if self.parallelism == "ddp" else self._module  # no DDP collective
        self.hooks_enabled = False
        try:
            return IndependenceProbe.start(target, 0 if self.batch_first else 1, leading, args, kwargs,
                                           self.hooks.leading_batch_size)
        finally:
            self.hooks_enabled = True

    def _start_step(self, leading: Optional[int], batch_size: Optional[int], from_forward: bool = True) -> ClippingStep:
        self._steps_started += 1
        return ClippingStep(self._steps_started, self.hooked, self.config, leading, batch_size, from_forward)

    def _follow_requires_grad(self) -> None:
        """Re-discovers the hooked layers when ``requires_grad`` changed since the last step (progressive
        unfreezing): a newly trainable layer gets hooks, a frozen one loses them, on every path (B = 1 too).

        Raises:
            RuntimeError: under DDP/FSDP, whose gradient reduction was laid out for the original parameters.
        """
        if self._trainable_flags() == self._flags_at_discovery:
            return
        if self.distributed:
            raise RuntimeError(
                "requires_grad changed after make_private on a DDP/FSDP model; freeze or unfreeze parameters "
                "before wrapping it (call make_private again with the new set)."
            )
        self.remove_hooks()
        self.trainable_parameters = [p for p in self._all_parameters if p.requires_grad]
        self._flags_at_discovery = self._trainable_flags()
        self.hooked = self._hook_model()
        self._last_sizes = None
        self.add_hooks()

    def _trainable_flags(self) -> tuple:
        """``requires_grad`` of every parameter of the wrapped module, in order."""
        return tuple(p.requires_grad for p in self._all_parameters)

    # -- the clipping workflow --------------------------------------------------------------------------
    def clipped_backward(self, loss_per_sample: torch.Tensor, zero_grad=None) -> None:
        """The whole clipping workflow: adds Σ_b c_b ∇ℓ_b to ``p.grad`` of every trainable parameter.

        Gradients that an earlier clipping step left for the optimizer (k backward passes before one ``step()``:
        gradient accumulation) are kept and summed with this one; the optimizer then divides by k × the expected
        batch size and tells the accountant k × the sample rate, as Opacus's hooks mode does. Any other gradient in
        ``p.grad`` (a plain backward's, one already used by a step) is discarded.

        Args:
            loss_per_sample: per-sample losses ℓ: [B], from this module's last forward.
            zero_grad: called as ``zero_grad(set_to_none=True)`` to discard gradients the workflow did not write
                (the DP criterion passes ``optimizer.zero_grad``).

        Raises:
            RuntimeError: no training forward captured this step (eval mode, hooks disabled, or the step's forward
                was already used by a backward), before anything changes.
            ValueError: invalid privacy parameters or a batch-size mismatch, before anything changes; a non-finite
                loss, after which the gradients are as they were before the call. The finiteness flag is copied to
                the host while the backward is issued and read at its end (under DDP/FSDP first, before any
                collective), so the GPU never drains mid-step.
        """
        loss_per_sample = one_per_sample(loss_per_sample)
        with phase(CLIPPED_BACKWARD):
            capturing = loss_per_sample.is_cuda and torch.cuda.is_current_stream_capturing()
            if capturing and self.distributed:
                raise NotImplementedError(
                    "CUDA-graph capture of a DDP/FSDP clipping step is not supported (its loss check and collectives "
                    "need the host): run distributed steps eagerly."
                )
            with phase(CHECKS):
                clip = self.privacy.pin()
                step = self._checked_step(loss_per_sample, finite=self.distributed)
                self._check_trainable_unchanged()
                refuse_parameter_hooks(self.trainable_parameters, self._parameter_names)
            step.graph_capture = capturing
            params = self.trainable_parameters
            prior, iterations = (None, 0) if capturing else take_pending_clipped_sum(params)
            if prior is None and zero_grad is not None:
                zero_grad(set_to_none=True)
            try:
                if step.single_sample:
                    with phase(SINGLE_SAMPLE):
                        self._record(step.single_sample_backward(loss_per_sample, params, clip,
                                                                 self._per_parameter_norms))
                else:
                    with phase(NORM_PASS):
                        norms = step.norm_pass(loss_per_sample, params, self._per_parameter_norms)
                    self._record(norms)
                    with phase(COEFFICIENTS):
                        coef = norms.clipping_coef(clip)
                    with phase(WRITE):
                        step.write(loss_per_sample, coef)
                self._fill_unused_gradients()
                self.captured_finite_check = step.check if capturing else None
                if step.check is not None and not capturing:
                    self._check_finite(step.check)
            except BaseException:
                for i, p in enumerate(params):
                    p.grad = None if prior is None else prior[i]
                raise
            finally:
                self._finish(step)
            if prior is not None:
                for p, earlier in zip(params, prior):
                    if earlier is not None:  # (None: frozen during the earlier micro-batches)
                        p.grad.add_(earlier)
            mark_clipped(params, iterations + 1)

    def compute_clipping_coef(self, loss_per_sample: torch.Tensor) -> torch.Tensor:
        """The norm pass alone: per-sample norms from every hooked layer → c: [B] (no gradient written)."""
        loss_per_sample = one_per_sample(loss_per_sample)
        step = self._checked_step(loss_per_sample, finite=True)
        self._record(step.norm_pass(loss_per_sample, self.trainable_parameters, self._per_parameter_norms))
        return self.get_clipping_coef()

    def write_clipped_gradients(self, loss_per_sample: torch.Tensor, coef: torch.Tensor) -> None:
        """After `compute_clipping_coef`: writes Σ_b c_b ∇ℓ_b into ``p.grad`` (zeros where unused)."""
        step = self.step
        if step is None or step.norms is None:
            raise RuntimeError("write_clipped_gradients needs the norms of this step: call compute_clipping_coef first.")
        try:
            step.write(one_per_sample(loss_per_sample), coef)
            self._fill_unused_gradients()
        finally:
            self._finish(step)

    def _checked_step(self, loss_per_sample: torch.Tensor, finite: bool) -> ClippingStep:
        """The step this loss belongs to, checked (`check_loss`; ``finite``: the loss
        is read now, and a non-finite one is rejected)."""
        step = self.step or self._start_step(None, None, from_forward=False)  # (none: its check_loss refuses)
        step.check_loss(loss_per_sample)
        if finite:
            self._check_finite(FiniteLossCheck(loss_per_sample))
        return step

    def _finish(self, step: ClippingStep) -> None:
        """Drops the step; its batch sizes are remembered for the next forward's one-sample shortcut if it clipped."""
        if self.step is step:
            self.step = None
            self._last_sizes = (step.leading_batch_size, step.batch_size) if step.norms is not None else None

    def _check_trainable_unchanged(self) -> None:
        """Raises (before anything changes) when ``requires_grad`` changed since this step's forward."""
        if self._trainable_flags() != self._flags_at_discovery:
            self.step.abandon()
            raise RuntimeError(
                "requires_grad changed between the forward pass and the backward pass; change it between steps "
                "(the next forward picks it up)."
            )

    def _fill_unused_gradients(self) -> None:
        for p in self.trainable_parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _check_finite(self, check: FiniteLossCheck) -> None:
        """Rejects the step if the checked loss had a NaN or ±inf (waits for its flag)."""
        with phase(CHECKS):
            finite = check.result()
        if not finite:
            self.reject_non_finite_step()

    def reject_non_finite_step(self) -> None:
        """Forgets the step, drops every gradient it wrote (``p.grad = None``) and raises ``ValueError``.

        Called when the loss was not finite: by the eager workflow, and by
        `CudaGraphStep` after a replay whose ``captured_finite_check`` fails.
        """
        if self.step is not None:
            self.step.abandon()
            self.step = None
        self._last_sizes = None
        for p in self.trainable_parameters:
            p.grad = None
        raise ValueError(NON_FINITE_LOSS)

    # -- Opacus-compatible accessors --------------------------------------------------------------------
    def _record(self, norms: NormRecord) -> None:
        """Keeps ``norms`` for the accessors; sets ``p._norm_sample`` = ‖∇_p ℓ_b‖ [B] where they are split by
        parameter, else removes those an earlier backward set (they would describe another batch)."""
        self.last_norms = norms
        self._per_sample_gradient_norms = None
        if norms.by_param is not None:
            for p, term in norms.by_param.items():
                p._norm_sample = term.clamp(min=0).sqrt()
            self._norm_samples_set = True
        elif self._norm_samples_set:
            for p in self._all_parameters:
                if hasattr(p, "_norm_sample"):
                    del p._norm_sample
            self._norm_samples_set = False

    def finish_plain_backward(self, step: ClippingStep) -> None:
        """At the end of a plain backward that reached the taps (queued by the first tap it reached): its norms, as
        Opacus's module leaves them, ‖∇ℓ_b‖ in `get_norm_sample` and ``p._norm_sample`` per parameter."""
        if self.step is step:
            pending = step.plain_backward_norms(self.trainable_parameters, self.loss_reduction)
            if pending is not None:
                self._record(pending)

    def record_norms(self, norms: NormRecord) -> None:
        """Sets the norms the accessors report (`CudaGraphStep` after a replay)."""
        self._record(norms)

    def get_norm_sample(self) -> torch.Tensor:
        """Per-sample gradient norms ‖g_b‖ of the last norm pass (or plain backward): [B]."""
        if self.step is not None:  # a plain backward at B = 1 (no tap told its end)
            self.finish_plain_backward(self.step)
        if self.last_norms is None:
            raise AttributeError("No norms yet: call backward on the loss from the DP criterion first.")
        norms = self.last_norms.norms()
        self.per_sample_gradient_norms = norms
        return norms

    def get_clipping_coef(self) -> torch.Tensor:
        """c_b = min(1, C / (‖g_b‖ + 1e-6), (1 + τ)·C / U_b) (`flashnorm.norms.rounding.clipping_coef`): [B]."""
        self.get_norm_sample()
        return self.last_norms.clipping_coef(self.privacy.clip_bound())

    @property
    def per_sample_gradient_norms(self) -> torch.Tensor:
        """Per-sample gradient norms of the last step (not private: for debugging only)."""
        if self._per_sample_gradient_norms is None:
            if self.last_norms is None:
                raise AttributeError("per_sample_gradient_norms is not set: run forward and backward first.")
            self.get_norm_sample()
        return self._per_sample_gradient_norms

    @per_sample_gradient_norms.setter
    def per_sample_gradient_norms(self, value: torch.Tensor) -> None:
        self._per_sample_gradient_norms = value
