"""One clipping step: what a training forward captured, the norm pass over it, and its state.

A `ClippingStep` is created when a training forward of the grad-sample module starts and discarded once the
clipped gradients are written. It holds the step's captures (each hooked layer's inputs X and output gradients G),
its `NormTerms` (per-layer norm terms and rounding allowances), the packed
per-sample gradient buffers, what the writer needs of each layer, the norms with their bound and the loss checks.
Its `StepState` says where it is:

    CAPTURED ──clipped_backward──▶ NORM_PASS ──▶ COEFFICIENTS ──▶ WRITING ──▶ (discarded)
        └──a plain loss.backward() reaches the taps──▶ PLAIN_BACKWARD (norms when it ends; the optimizer refuses)

A step whose loss fails a check is ABANDONED: nothing it captured is used again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..kernels import multi_tensor
from ..kernels.accumulation import accumulation_dtype
from ..norms import rounding
from ..norms.registry import per_sample_norms
from .capture import HookedLayer, HookedModel, LayerCapture, OutputScale
from .config import StepConfig
from .layer_groups import plan_layer_groups
from .loss_check import FiniteLossCheck
from .norm_pass import NormTerms
from .packed_grads import plan_packed_grads
from .phases import NORMS, phase, recording
from .recompute import RandomStateWatch, refuse_unrepeatable_recompute


class StepState(enum.Enum):
    """Where a `ClippingStep` is."""

    CAPTURED = "captured"  # the training forward ran; its loss awaits one backward
    NORM_PASS = "norm pass"  # the workflow's pass to the gradient taps: the taps hand G to the layers' counts
    COEFFICIENTS = "coefficients"  # the norms are known; the gradients are not written yet
    WRITING = "writing"  # the writer runs (a second backward reaches the taps again: ignored)
    PLAIN_BACKWARD = "plain backward"  # a backward other than the workflow's reached the taps
    ABANDONED = "abandoned"  # a check refused the step's loss; its captures are dropped


@dataclass(frozen=True)
class NormRecord:
    """A step's squared per-sample gradient norms ‖ĝ_b‖² [B] and their rounding upper bound U_b [B] (``None``
    where no allowance was noted): everything the clipping coefficient depends on besides C. ``by_param``, where
    the step was asked to split its norms: ‖∇_θ ℓ_b‖² [B] for every trainable θ (they sum to ``norm_sq``)."""

    norm_sq: torch.Tensor
    bound: Optional[torch.Tensor] = None
    by_param: Optional[Dict[nn.Parameter, torch.Tensor]] = None

    def norms(self) -> torch.Tensor:
        """‖g_b‖: [B] (an estimate cancelled below 0 is ≈ 0; its bound clips it)."""
        return self.norm_sq.clamp(min=0).sqrt()

    def clipping_coef(self, max_grad_norm: float) -> torch.Tensor:
        """c_b (`flashnorm.norms.rounding.clipping_coef`): [B]."""
        return rounding.clipping_coef(self.norm_sq, self.bound, max_grad_norm)


class ClippingStep:
    """The state of one clipping step (see the module docstring).

    Args:
        number: the step's number (gradient taps carry it: a backward from an older forward is recognised).
        hooked: the hooked model.
        config: the module's `StepConfig`.
        leading_batch_size: the batch size of the forward's call (`LayerHooks.call_batch_size`), if known.
        batch_size: the layers' batch size when known in advance (a trusted step of one sample), else ``None``
            (the first hooked layer tells).
        from_forward: made by the wrapper's training forward (``False``: by a hooked layer called outside it).
    """

    def __init__(self, number: int, hooked: HookedModel, config: StepConfig, leading_batch_size: Optional[int] = None,
                 batch_size: Optional[int] = None, from_forward: bool = True):
        self.number = number
        self.hooked = hooked
        self.config = config
        self.leading_batch_size = leading_batch_size
        self.batch_size = batch_size
        self.state = StepState.CAPTURED
        self.from_forward = from_forward  # made by the wrapper's training forward (else by a layer called directly)
        self.captures: List[Optional[LayerCapture]] = [None] * len(hooked.layers)
        #: A hooked layer ran under ``no_grad`` inside this training forward: reentrant activation checkpointing,
        #: which captures it when the backward recomputes it (the norm pass then runs as a full backward).
        self.recomputes_layers = False
        self.graph_capture = False  # the step is being captured in a CUDA graph
        self.reached_taps = False  # the norm pass reached a gradient tap
        self.terms: Optional[NormTerms] = None
        self.packed = None  # PackedPerSampleGrads of the norm pass, until the writer has used them
        self.kept: dict = {}  # layer → what the writer needs of it
        self.norms: Optional[NormRecord] = None
        self.check: Optional[FiniteLossCheck] = None  # losses and norms finite, read after the step is issued
        self.output_scale = OutputScale()  # the coefficients the model outputs' rows take in a second backward
        self.last_layer_output: Optional[torch.Tensor] = None  # the last hooked layer's output in the forward
        self.checkpointed = False  # a hooked layer ran inside non-reentrant activation checkpointing

    @property
    def layers(self) -> List[HookedLayer]:
        return self.hooked.layers

    @property
    def single_sample(self) -> bool:
        """The batch holds one sample and the shortcut applies (``StepConfig.one_sample_shortcut``): one ordinary
        backward, whose gradient *is* the per-sample gradient."""
        return self.batch_size == 1 and self.config.one_sample_shortcut

    # -- the forward side ----------------------------------------------------------------------------
    def captured(self, layer: HookedLayer) -> bool:
        """Whether this step's forward tapped ``layer`` (a recompute then only fills in X)."""
        return self.captures[layer.index] is not None

    def inputs_of(self, layer: HookedLayer) -> List[Optional[torch.Tensor]]:
        """The inputs X this step captured of ``layer``, one per use (``None``: left to the recompute), until the
        norm pass counts them."""
        capture = self.captures[layer.index]
        return [] if capture is None else list(capture.xs)

    def record_input(self, layer: HookedLayer, x: Optional[torch.Tensor], out_meta: tuple) -> int:
        """Records a use of ``layer`` with input ``x`` (``None``: the recompute supplies it); returns its index."""
        capture = self.captures[layer.index]
        if capture is None:
            capture = self.captures[layer.index] = LayerCapture()
        if not capture.xs:
            capture.out_meta = out_meta
        capture.xs.append(x)
        capture.gs.append(None)
        return len(capture.xs) - 1

    def fill_deferred_input(self, layer: HookedLayer, x: torch.Tensor) -> None:
        """The recompute's input ``x`` (batch first) for the next use whose X the forward left to it."""
        capture = self.captures[layer.index]
        for i, known in enumerate(capture.xs):
            if known is None:
                if self.batch_size is not None and x.shape[0] == 1 != self.batch_size:
                    x = x.expand(self.batch_size, *x.shape[1:])
                capture.xs[i] = x
                if capture.complete():
                    self._count(layer, capture)
                return

    # -- the backward side -----------------------------------------------------------------------------
    def receive_gradient(self, layer: HookedLayer, grad_output: torch.Tensor, number: int, use: int) -> bool:
        """A gradient tap's callback: the output gradient of use ``use`` of ``layer`` in step ``number``. Returns
        whether this gradient started a plain backward (one other than the workflow's passes).

        Raises:
            RuntimeError: in the norm pass, a gradient from a forward other than this step's.
        """
        state = self.state
        if state is StepState.WRITING:
            return False  # the second pass of a two-pass step: the norms are done
        capture = self.captures[layer.index]
        if number != self.number or capture is None or use >= len(capture.gs):
            if state is not StepState.NORM_PASS:
                return False  # a plain backward of an older forward: nothing to record
            # Never skip a layer: a missing norm term would under-clip and break the guarantee.
            raise RuntimeError(
                f"Layer '{layer.name}' is back-propagated from a forward pass other than the model's last one. "
                "Run the forward and the DP loss's backward in pairs: loss = criterion(model(x), y); loss.backward()."
            )
        started = state is StepState.CAPTURED
        if state is not StepState.NORM_PASS:
            self.state = StepState.PLAIN_BACKWARD
        capture.gs[use] = grad_output.detach() if layer.batch_first else grad_output.detach().movedim(1, 0)
        capture.arrived += 1
        self.reached_taps = True
        if capture.complete():
            self._count(layer, capture)
        return started

    def _count(self, layer: HookedLayer, capture: LayerCapture) -> None:
        if self.terms is None:  # a plain backward: norms split by parameter (Opacus's), nothing kept for a writer
            self.terms = NormTerms(self.config, self.hooked, None, None, by_param=self.config.splits_norms)
        if not recording():
            self.terms.count(layer, *capture.take())
            return
        with phase(NORMS):
            self.terms.count(layer, *capture.take())

    def _count_remaining(self) -> None:
        """After a pass: the layers whose uses did not all receive a gradient (those that did count)."""
        for layer, capture in zip(self.layers, self.captures):
            if capture is not None and capture.arrived:
                self._count(layer, capture)
            elif capture is not None:
                capture.take()
        if self.terms is not None:
            with phase(NORMS):  # the groups only part of whose layers received a gradient; the cross terms
                self.terms.flush_groups()
                self.terms.add_cross_terms()

    # -- checks ----------------------------------------------------------------------------------------
    def check_loss(self, loss_per_sample: torch.Tensor) -> None:
        """Raises (abandoning the step on a wrong shape) unless the loss is [B] for this forward's B.

        Raises:
            RuntimeError: no training forward captured this step, or its loss was back-propagated already.
            ValueError: the loss's shape.
        """
        if self.state is StepState.PLAIN_BACKWARD:
            raise RuntimeError(
                "This forward was already back-propagated by a backward other than the DP loss's (a plain "
                "loss.backward(), or torch.autograd.grad through the model, e.g. an input-gradient penalty): its "
                "gradient would not be clipped per sample. The DP loss's backward must be the only backward of a "
                "forward; run the forward again."
            )
        if self.batch_size is None and self.recomputes_layers and self.state is StepState.CAPTURED:
            self.batch_size = loss_per_sample.shape[0]  # every layer runs inside reentrant checkpointing
        if self.batch_size is None and self.from_forward and self.state is StepState.CAPTURED:
            raise RuntimeError(
                f"The model's training forward ran none of its hooked layers ({', '.join(l.name for l in self.layers[:5])}"
                f"{', ...' if len(self.layers) > 5 else ''}): its trainable parameters are read outside a module's own "
                "forward (e.g. an nn.ParameterList or nn.Parameter used directly in forward), which FlashNorm cannot "
                "clip per sample. Hold them in layers (nn.Linear, nn.Embedding, ...) or use grad_sample_mode='hooks'."
            )
        if self.batch_size is None or self.state is not StepState.CAPTURED:
            raise RuntimeError(
                "No captured forward pass for this loss: run the wrapped model's forward in training mode "
                "(model.train(), grad enabled, hooks enabled) before each backward on the DP loss; a forward's "
                "loss can be back-propagated once."
            )
        if loss_per_sample.dim() != 1 or loss_per_sample.shape[0] != self.batch_size:
            self.abandon()
            raise ValueError(
                f"The per-sample loss has shape {tuple(loss_per_sample.shape)} but the model's forward saw batch size "
                f"{self.batch_size}; the loss must hold one value per sample: [B]. For token-level losses call the "
                "criterion with shape=(B, T, V) so that the privacy unit is the sequence."
            )

    def abandon(self) -> None:
        """Drops everything the step captured or computed; its loss can no longer be back-propagated."""
        self.state = StepState.ABANDONED
        self.captures = [None] * len(self.captures)
        self.terms = self.packed = None
        self.kept = {}

    # -- the norm pass -----------------------------------------------------------------------------------
    def norm_pass(self, loss_per_sample: torch.Tensor, trainable_parameters: List[nn.Parameter],
                  by_param: bool = False) -> NormRecord:
        """``torch.autograd.grad(Σ_b ℓ_b, taps + parameters)``: every layer's norm terms, no parameter gradient.

        The parameters are asked for too: inside their layers they are read through aliases
        (`aliases`), so a gradient there means a read outside its layer. With
        ``by_param`` the norms are also split by parameter (`NormRecord.by_param`).

        Raises:
            RuntimeError: the loss reaches no gradient tap of this step.
            NotImplementedError: a parameter read outside its layer.
        """
        config, hooked, writer = self.config, self.hooked, self.config.writer
        batch, device = loss_per_sample.shape[0], loss_per_sample.device
        self.state = StepState.NORM_PASS
        captured = [(layer, c) for layer, c in zip(self.layers, self.captures) if c is not None]
        grouping = writer.assembles_groups and not by_param and config.backend != "triton"
        groups = plan_layer_groups(captured, config.method, hooked.group_plans) if grouping else {}
        if config.packs_per_sample_grads:
            self.packed = plan_packed_grads([(layer, c) for layer, c in captured if layer not in groups], batch,
                                            device, config.method, vectors_only=not writer.applies_kept_per_sample)
        self.terms = NormTerms(config, hooked, self.packed, partial(writer.keep, self.kept), by_param, groups)
        # a second backward recomputes checkpointed regions again: they must draw no random numbers of their own
        watch = RandomStateWatch(device) if writer.retains_graph and (self.checkpointed or self.recomputes_layers) else None
        try:
            self.reached_taps = False
            if not loss_per_sample.requires_grad:
                raise RuntimeError(_UNREACHED_CHECKPOINTED_LAYERS if self.recomputes_layers else (
                    "The DP loss does not require grad: no trainable parameter of the wrapped model reaches it."))
            if self.recomputes_layers:
                outside = self._full_norm_pass(loss_per_sample, trainable_parameters)
            else:
                taps = list(hooked.taps.values())
                params = [hooked.aliases.original(p) for p in hooked.hooked_params]
                grads = torch.autograd.grad(
                    loss_per_sample.sum(), taps + params, allow_unused=True, retain_graph=writer.retains_graph
                )
                outside = [p for p, grad in zip(params, grads[len(taps):]) if grad is not None]
            if self.recomputes_layers and not self.reached_taps:
                raise RuntimeError(_UNREACHED_CHECKPOINTED_LAYERS)
            if hooked.taps and not self.reached_taps:
                # The loss reaches no gradient tap: it was built from a forward that captured nothing (eval mode,
                # hooks disabled) while a training forward's captures wait unused; its norms would read 0.
                raise RuntimeError(
                    "No captured forward pass for this loss: the loss does not come from the wrapped model's last "
                    "training forward (a forward in eval mode or with hooks disabled captures nothing). Run the "
                    "forward in training mode (model.train(), hooks enabled) before each backward on the DP loss."
                )
            self._refuse_outside_uses(outside)
            refuse_unrepeatable_recompute(watch)
            self._count_remaining()
            self.norms = self._record(self.terms, batch, trainable_parameters, device)
        except BaseException:
            self.packed = None
            raise
        finally:
            for capture in self.captures:
                if capture is not None:
                    capture.take()
        if not writer.applies_kept_per_sample:
            self.packed = None  # the writer computes the clipped gradients itself
        self.terms = None
        if not config.distributed:  # (DDP/FSDP checked the loss before any collective; norms are rank-local)
            self.check = FiniteLossCheck(_losses_and_norms(loss_per_sample, self.norms), self.graph_capture)
        self.state = StepState.COEFFICIENTS
        return self.norms

    def plain_backward_norms(self, params: List[nn.Parameter], loss_reduction: str) -> Optional[NormRecord]:
        """The norms of a plain backward of this step's forward, as Opacus defines them (‖∇ℓ_b‖ whatever
        ``loss_reduction``: a ``mean`` loss's gradient is each sample's over B), computed once, on request; ``None``
        when no plain backward ran.

        A plain backward that reached the taps gives the layers' norm terms; one of a single sample (whose forward
        captured nothing) gives the norm of the gradients it left, the sample's own.
        """
        if self.state is StepState.CAPTURED and self.single_sample:
            grads = [p.grad for p in params if p.grad is not None]
            return self._one_sample_norms(params, grads, self.config.splits_norms) if grads else None
        if self.state is not StepState.PLAIN_BACKWARD or self.norms is not None:
            return None  # (computed already: the module holds them)
        self._count_remaining()
        terms, self.terms = self.terms, None
        batch = self.batch_size or 0
        if terms is None:
            zeros = torch.zeros(batch)
            self.norms = NormRecord(zeros, None, {p: zeros for p in params} if self.config.splits_norms else None)
        else:
            self.norms = self._record(terms, batch, params)
        if loss_reduction == "mean" and batch > 1:
            scale, norms = batch**2, self.norms
            self.norms = NormRecord(
                norms.norm_sq * scale, None if norms.bound is None else norms.bound * batch,
                None if norms.by_param is None else {p: term * scale for p, term in norms.by_param.items()},
            )
        return self.norms

    @staticmethod
    def _record(terms: NormTerms, batch: int, params: List[nn.Parameter], device=None) -> NormRecord:
        """The `NormRecord` of counted ``terms``, split over ``params`` where the terms were."""
        norm_sq, bound = terms.result(batch, device)
        by_param = terms.by_parameter(params, norm_sq) if terms.param_terms is not None else None
        return NormRecord(norm_sq, bound, by_param)

    def _one_sample_norms(self, params: List[nn.Parameter], grads: List[torch.Tensor], by_param: bool) -> NormRecord:
        """The squared norm of ``grads``, the gradients in ``p.grad`` of ``params`` (a batch of one: the sample's
        own), by one multi-tensor pass (float32, float64 for float64); with ``by_param`` also each parameter's,
        ‖p.grad‖² ([1], 0 where ``p.grad`` is ``None``)."""
        norm_sq = multi_tensor.squared_norm(grads, backend=self.config.backend)
        if not by_param:
            return NormRecord(norm_sq)
        grads = {p: p.grad.unsqueeze(0) for p in params if p.grad is not None}
        split = dict(zip(grads, per_sample_norms(grads)))
        return NormRecord(norm_sq, None, {
            p: split[p].square().to(norm_sq.dtype) if p in split else torch.zeros_like(norm_sq) for p in params
        })

    def _full_norm_pass(self, loss_per_sample: torch.Tensor, params: List[nn.Parameter]) -> List[nn.Parameter]:
        """The norm pass as an ordinary backward, for layers captured only when reentrant activation checkpointing
        recomputes them (``torch.utils.checkpoint`` refuses ``autograd.grad``): the parameter gradients it also
        computes are unclipped and discarded (those of the aliases are dropped as they arrive, so a gradient
        left on a hooked parameter comes from a use outside its layer: those parameters are returned)."""
        hooked = self.hooked
        prior = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with hooked.aliases.dropping_gradients():
                torch.autograd.backward(loss_per_sample.sum(), retain_graph=self.config.writer.retains_graph)
            return [p for p in hooked.hooked_params if p.grad is not None or hooked.aliases.original(p).grad is not None]
        finally:
            for p, grad in zip(params, prior):
                p.grad = grad
            for tap in hooked.taps.values():
                tap.grad = None

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

    # -- one sample -------------------------------------------------------------------------------------
    def single_sample_backward(self, loss_per_sample: torch.Tensor, params: List[nn.Parameter], clip: float,
                               by_param: bool = False) -> NormRecord:
        """B = 1: one ordinary backward, then the gradients clipped as one vector, c = min(1, C/(‖g‖ + 10⁻⁶)):
        one multi-tensor pass for the norm (float32, float64 for float64), the coefficient computed from it on the
        device (`clipping_coef`), and one multi-tensor scaling by it (``by_param``:
        the norms split by parameter too, before the scaling)."""
        if not self.config.distributed:
            self.check = FiniteLossCheck(loss_per_sample, self.graph_capture)
        torch.autograd.backward(loss_per_sample.sum())
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            norm_sq = torch.zeros(1, dtype=accumulation_dtype(loss_per_sample), device=loss_per_sample.device)
            self.norms = NormRecord(norm_sq, None, {p: norm_sq for p in params} if by_param else None)
            return self.norms
        self.norms = self._one_sample_norms(params, grads, by_param)
        multi_tensor.scale_(grads, rounding.clipping_coef(self.norms.norm_sq, None, clip), backend=self.config.backend)
        return self.norms

    # -- the write ---------------------------------------------------------------------------------------
    def write(self, loss_per_sample: torch.Tensor, coef: torch.Tensor) -> None:
        """The writer adds Σ_b c_b ∇ℓ_b into ``p.grad``."""
        self.state = StepState.WRITING
        self.config.writer.write(self, loss_per_sample, coef, self.config.backend)


_UNREACHED_CHECKPOINTED_LAYERS = (
    "No gradient reached the model's layers: they run inside reentrant activation checkpointing "
    "(torch.utils.checkpoint with use_reentrant=True) whose inputs do not require grad, so autograd skips them. Use "
    "use_reentrant=False (Hugging Face: gradient_checkpointing_kwargs={'use_reentrant': False}), or make an input of "
    "each checkpointed block require grad."
)


def _losses_and_norms(loss_per_sample: torch.Tensor, norms: NormRecord) -> torch.Tensor:
    """What the step's one check reads: every loss finite, every norm estimate finite and ≥ 0 or, where it
    cancelled below 0, its rounding bound finite (a NaN norm would give c = NaN and poison the other samples)."""
    norm_sq, bound = norms.norm_sq, norms.bound
    valid = norm_sq if bound is None else norm_sq.clamp(min=0) + bound
    valid = torch.where(valid >= 0, valid, torch.full_like(valid, float("nan")))
    return torch.cat([loss_per_sample.detach().to(norm_sq.dtype), valid])


def one_per_sample(loss_per_sample: torch.Tensor) -> torch.Tensor:
    """A per-sample loss [B, 1] (a criterion that keeps a trailing dimension) as [B]; anything else as it is."""
    if loss_per_sample.dim() == 2 and loss_per_sample.shape[1] == 1:
        return loss_per_sample.view(-1)
    return loss_per_sample
