"""The norm terms of one step: each hooked layer's per-sample squared norms from its captures, summed.

A layer's uses are counted once all their output gradients G and inputs X are in (`ClippingStep`
decides when): one use as it is; k uses joined into one call where the rule can
(`join_uses`), else their per-sample gradients summed. A layer sharing a parameter
with another (tied weights) is counted like any other, and the cross term 2⟨∇_θ^A, ∇_θ^B⟩
(`flashnorm.norms.tied`) is added once both are counted. Uses that never received a gradient (outputs that do
not reach the loss) contribute nothing, exactly.

Same-shaped layers planned into a `LayerGroup` (`layer_groups`) are counted once the whole group is in, as one
batch of their stacked captures: one norm launch, one rounding scale, and one `KeptGroup` for the writer.

Besides the terms, each layer notes its share of the clipping coefficient's rounding allowance
(`flashnorm.norms.rounding`): after the pass, `NormTerms.result` gives the squared norms ‖ĝ_b‖² and their
upper bound U_b.

Asked to (``by_param``: a plain backward, or a module whose ``per_parameter_norms`` is on), the terms are also kept
split by parameter, ‖∇_θ ℓ_b‖² for each trainable θ (`NormTerms.by_parameter`): each layer's rule splits its
term (`norm_sq_by_param`), a packed buffer gives each slot's norm, and a shared
parameter adds its cross terms to its own entry. Otherwise nothing is split: the step's cost is unchanged.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..kernels.accumulation import accumulation_dtype
from ..norms import rounding
from ..norms.registry import per_sample_norms
from ..norms.tied import CrossTerm, cross_term, per_sample_cross
from .capture import HookedLayer, HookedModel
from .config import StepConfig
from .layer_groups import LayerGroup
from .packed_grads import PackedPerSampleGrads
from .writers import KeptGroup, KeptGroupGrads, KeptInputs, KeptPacked, KeptPerSample


class NormTerms:
    """One step's per-layer norm terms and rounding allowances, summed into ‖ĝ_b‖² and U_b after the pass.

    Args:
        config: the module's `StepConfig`.
        hooked: the hooked model (its shared groups give the cross terms).
        packed: the packed per-sample gradient buffers of this pass, or ``None``.
        keep: called as ``keep(layer, kept)`` with what the writer needs of each counted layer (a
            `writers` record), or ``None`` when nothing is kept (a two-pass step,
            a plain backward).
        by_param: also keep the terms split by parameter (`by_parameter`).
        groups: each grouped layer's `LayerGroup` (`layer_groups.plan_layer_groups`; only where ``keep`` is
            given and ``by_param`` is not).
    """

    def __init__(self, config: StepConfig, hooked: HookedModel, packed: Optional[PackedPerSampleGrads],
                 keep: Optional[Callable[[HookedLayer, object], None]], by_param: bool = False,
                 groups: Optional[Dict[HookedLayer, LayerGroup]] = None):
        self.config = config
        self.hooked = hooked
        self.packed = packed
        self.keep = keep
        self.groups = groups or {}
        self.terms: List[torch.Tensor] = []  # squared per-sample norms, one [B] per layer and cross term
        self.roots: List[torch.Tensor] = []  # per-sample norms, one [B] per parameter
        self.radii: List[torch.Tensor] = []  # rounding radii r, one [B] per layer
        self.shared_radius: Optional[torch.Tensor] = None  # Σ of the radii of layers sharing a parameter
        self.slack_sq: List[torch.Tensor] = []  # squared-domain allowances Q, one [B] per Gram / cross term
        self.shared_inputs: Dict[HookedLayer, tuple] = {}  # (x, g) of layers sharing a parameter
        self.shared_grads: Dict[HookedLayer, dict] = {}  # or their per-sample gradients
        self.shared_norm_sq: Dict[HookedLayer, torch.Tensor] = {}  # their own terms ‖∇^A ℓ_b‖² [B]
        self.shared_errors: Dict[HookedLayer, torch.Tensor] = {}  # and their per-sample gradients' rounding γ·s [B]
        #: θ → its squared per-sample norm terms [B] (``by_param``), else ``None``
        self.param_terms: Optional[Dict[nn.Parameter, List[torch.Tensor]]] = {} if by_param else None

    # -- one layer ---------------------------------------------------------------------------------
    def count(self, layer: HookedLayer, xs: list, gs: list) -> None:
        """Norm terms of the layer's uses that received a gradient (and, where kept, what the writer needs).

        Raises:
            RuntimeError: a use received its output gradient but its input was never captured.
        """
        if len(xs) == 1 and xs[0] is not None and gs[0] is not None:  # one use: the usual case
            x, g = xs[0], gs[0]
            if x.shape[0] == 0:
                return
            group = self.groups.get(layer)
            if group is None:
                self._counted(layer, self._count_joined(layer, x, g), x, g)
            elif group.add(layer, x, g):
                self._count_group(group)
            return
        missing = [i for i, (x, g) in enumerate(zip(xs, gs)) if g is not None and x is None]
        if missing:
            raise RuntimeError(
                f"Layer '{layer.name}' received its output gradient but its input was never captured (use "
                f"{missing[0]}): activation checkpointing that FlashNorm does not recognise. No step was taken."
            )
        uses = [(x, g) for x, g in zip(xs, gs) if g is not None]
        if not uses or uses[0][0].shape[0] == 0:
            return
        x, g = uses[0] if len(uses) == 1 else (layer.rule.join_uses(layer.module, *map(list, zip(*uses))) or (None, None))
        if x is None:
            self._counted(layer, self._per_sample_sum(layer, uses))
        else:
            self._counted(layer, self._count_joined(layer, x, g), x, g)

    def _count_group(self, group: LayerGroup) -> None:
        """The norm terms of a group's layers that arrived, counted as one batch of their stacked captures: the
        [L·B] terms and radii viewed [L, B] (the radii of different parameters add in quadrature), and one
        `KeptGroup` for the writer."""
        layers, x, g = group.take()
        first = layers[0]
        if len(layers) == 1:
            self._counted(first, self._count_joined(first, x, g), x, g)
            return
        members, batch = len(layers), x.shape[0] // len(layers)
        modules, backend = [layer.module for layer in layers], self.config.backend
        radius = self._note_rounding(first, x, g, group.method, members)
        if radius is not None:
            self.radii.extend(radius.view(members, batch).unbind(0))
        if group.method == "per_sample":  # (applied as measured: no rounding allowance, as for packed buffers)
            names = {p: name for name, p in first.module.named_parameters(recurse=False)}
            grads = {names[p]: gs.view(members, batch, -1)
                     for p, gs in first.rule.per_sample_grads(first.module, x, g, backend=backend).items()}
            self.terms.append(sum(gs.square().sum(dim=(0, 2)) for gs in grads.values()))
            self.keep(first, KeptGroupGrads(modules, grads))
            return
        term = first.rule.norm_sq(first.module, x, g, group.method, backend=backend)
        self.terms.append(term.view(members, batch).sum(dim=0))
        self.keep(first, KeptGroup(modules, x, g))

    def flush_groups(self) -> None:
        """After a pass: the groups only part of whose layers received a gradient, counted as they are."""
        for group in {id(group): group for group in self.groups.values()}.values():
            if group.pending:
                self._count_group(group)

    def _counted(self, layer: HookedLayer, kept, x=None, g=None) -> None:
        if layer.shared and x is not None:
            self.shared_inputs[layer] = (x, g)
        if self.keep is not None:
            self.keep(layer, kept)

    def _count_joined(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor):
        method = self.config.method(layer, x, g.shape, g.dtype, g)
        if method == "per_sample":
            return self._per_sample(layer, x, g)
        with_vectors = bool(layer.shared) or not self._vectors_to_packed(layer, x, g)
        if self.param_terms is None:
            self.terms.append(layer.rule.norm_sq(layer.module, x, g, method, vectors=with_vectors, backend=self.config.backend))
            added = self.terms[-1:]
        else:
            parts = layer.rule.norm_sq_by_param(layer.module, x, g, method, vectors=with_vectors, backend=self.config.backend)
            self.terms.extend(parts.values())
            self._split(parts)
            added = list(parts.values())
        if layer.shared:
            self.shared_norm_sq[layer] = sum(added)
        self._add_radius(layer, self._note_rounding(layer, x, g, method))
        return KeptInputs(method, x, g, with_vectors)

    def _per_sample(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor):
        """The layer's per-sample gradients, packed where they have room; their norms go to the roots.

        Returns what the one-pass assembly keeps: `KeptPacked` or `KeptPerSample`.
        """
        packed = self.packed
        slots = {p: slot for p in layer.params if (slot := packed.slot(p)) is not None} if packed is not None else {}
        # (a slot's buffer is allocated here, when the pass first reaches it)
        grads = layer.rule.per_sample_grads(layer.module, x, g, out=slots or None, backend=self.config.backend)
        self._add_radius(layer, self._note_rounding(layer, x, g, "per_sample"))
        separate = {p: gs for p, gs in grads.items() if slots.get(p) is None or not packed.store(p, gs)}
        if layer.shared:
            self.shared_grads[layer] = grads
            self.shared_norm_sq[layer] = sum(n.square() for n in per_sample_norms(grads))
        if separate:  # norms squared and summed once, after the pass; the rest is in the packed norms
            self._add_roots(separate)
            return KeptPerSample(separate)
        return KeptPacked()

    def _per_sample_sum(self, layer: HookedLayer, uses) -> KeptPerSample:
        """Σ over the uses of the per-sample gradients, where the rule cannot join the uses (B·|θ| memory)."""
        total, radii = {}, []
        for x, g in uses:
            for p, gs in layer.rule.per_sample_grads(layer.module, x, g, backend=self.config.backend).items():
                total[p] = gs.clone() if p not in total else total[p].add_(gs)
            radius = self._note_rounding(layer, x, g, "per_sample")
            if radius is not None:
                radii.append(radius)
        self._add_radius(layer, sum(radii) if radii else None)  # the uses' errors fall on the same coordinates
        roots = self._add_roots(total)
        if layer.shared:
            self.shared_grads[layer] = total
            self.shared_norm_sq[layer] = sum(n.square() for n in roots)
        return KeptPerSample(total)

    def _add_roots(self, grads: Dict[nn.Parameter, torch.Tensor]) -> List[torch.Tensor]:
        """The norms of per-sample gradients {θ: [B, *θ.shape]}, one [B] per parameter (and, split, their squares);
        returns them."""
        roots = per_sample_norms(grads)
        self.roots.extend(roots)
        if self.param_terms is not None:
            self._split({p: root.square() for p, root in zip(grads, roots)})
        return roots

    def _split(self, parts: Dict[nn.Parameter, torch.Tensor]) -> None:
        """Adds {θ: ‖∇_θ ℓ_b‖² term [B]} to the split terms."""
        for p, term in parts.items():
            self.param_terms.setdefault(p, []).append(term)

    def _vectors_to_packed(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor) -> bool:
        """Writes the layer's vector parameters' per-sample gradients into their packed slots (the rest of the
        layer takes a norm kernel); ``False`` when they have no room there (the rule then counts them)."""
        slots = {p: self.packed.slot(p) for p in layer.vectors} if self.packed is not None else {}
        if not slots or any(slot is None for slot in slots.values()):
            return False
        for p, gs in layer.rule.vector_grads(layer.module, x, g, out=slots, backend=self.config.backend).items():
            self.packed.store(p, gs)
        return True

    # -- rounding allowances -------------------------------------------------------------------------
    def _note_rounding(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor, method: str,
                       members: int = 1) -> Optional[torch.Tensor]:
        """The layer's share of the clipping coefficient's rounding allowance (`rounding`):
        returns its radius r = (γ_norm + γ_applied)·s over the two computations of its per-sample gradient (``None``
        where the writer applies the very per-sample gradients it took the norm of, or the rule has no model),
        notes the Gram form's γ_G·s², and keeps γ·s of a layer sharing a parameter for its cross terms.
        ``members``: x and g stack that many layers' captures of B samples each (a `LayerGroup`): the radius is
        [members·B] and the Gram allowance is summed over them."""
        consistent = method == "per_sample" and self.config.writer.applies_kept_per_sample
        scale = None if consistent else layer.rule.rounding_scale(layer.module, x, g)
        if scale is None:
            return None
        s, terms = scale
        gamma = rounding.gamma(terms, x.shape[0] // members, g.dtype)
        if layer.shared:  # a layer's uses add up (a multi-use layer is noted once per use)
            kept = self.shared_errors.get(layer)
            self.shared_errors[layer] = s * gamma if kept is None else kept + s * gamma
        if method == "gram":  # the norm's error is γ_G·s² (squared domain); only the applied sum has a radius
            batch, steps, d, p = layer.rule.sizes(layer.module, x, g)
            gram_dtype = torch.float64 if rounding.gram_in_float64(steps, g.dtype) else g.dtype
            slack = s.square().mul_(rounding.gram_gamma(steps, d, p, gram_dtype))
            self.slack_sq.append(slack if members == 1 else slack.view(members, -1).sum(dim=0))
            return s * gamma
        return s * (2 * gamma)

    def _add_radius(self, layer: HookedLayer, radius: Optional[torch.Tensor]) -> None:
        """Radii of different parameters add in quadrature (their errors lie on different coordinates); those of
        layers sharing a parameter, and of one layer's uses, add linearly (theirs fall on the same ones)."""
        if radius is None:
            return
        if layer.shared:
            self.shared_radius = radius if self.shared_radius is None else self.shared_radius + radius
        else:
            self.radii.append(radius)

    # -- after the pass ----------------------------------------------------------------------------------
    def add_cross_terms(self) -> None:
        """The cross terms 2⟨∇_θ^A, ∇_θ^B⟩ of every parameter shared by two counted layers, and their rounding."""
        try:
            for param, sharing in self.hooked.shared_groups:
                counted = [layer for layer in sharing if layer in self.shared_inputs or layer in self.shared_grads]
                for i, a in enumerate(counted):
                    for b in counted[i + 1:]:
                        cross, materialized = self._cross(a, b, param)
                        self.terms.append(2 * cross.value)
                        if self.param_terms is not None:
                            self._split({param: self.terms[-1]})
                        self._note_cross_rounding(a, b, cross, materialized)
        finally:
            self.shared_inputs, self.shared_grads, self.shared_norm_sq, self.shared_errors = {}, {}, {}, {}

    def _cross(self, a: HookedLayer, b: HookedLayer, param) -> Tuple[CrossTerm, bool]:
        """⟨∇_θ^A, ∇_θ^B⟩ per sample for θ = ``param`` used by layers a and b, and whether it was taken from
        per-sample gradients (rounded as they were formed) rather than from the captures directly."""
        grads_a, grads_b = self.shared_grads.get(a), self.shared_grads.get(b)
        backend = self.config.backend
        if grads_a is None and grads_b is None:
            return cross_term(a.rule, a.module, *self.shared_inputs[a], b.rule, b.module, *self.shared_inputs[b],
                              param, backend=backend), False
        if grads_a is None:
            grads_a = a.rule.per_sample_grads(a.module, *self.shared_inputs[a], backend=backend)
        if grads_b is None:
            grads_b = b.rule.per_sample_grads(b.module, *self.shared_inputs[b], backend=backend)
        return per_sample_cross(grads_a[param], grads_b[param]), True

    def _note_cross_rounding(self, a: HookedLayer, b: HookedLayer, cross: CrossTerm, materialized: bool) -> None:
        """The squared-domain allowance of a cross term, 2·(ε + δ_A·n_A + δ_B·n_B), with n the layers' own norms
        as counted and δ = γ·s the rounding of their norms (0 where the very per-sample gradients measured are
        applied): the estimate n_A² + n_B² + 2ĉ must bound ‖W_A + W_B‖² = ‖W_A‖² + ‖W_B‖² + 2⟨W_A, W_B⟩, and
        ‖W‖² ≤ (n + δ)² (the δ² are in R, which holds δ_A + δ_B), |ĉ − ⟨W_A, W_B⟩| ≤ ε, the cross term's own
        rounding (`CrossTerm`). Taken from per-sample gradients Ŵ that were rounded as formed, ε also has
        δ_A·n_B + (n_A + δ_A)·δ_B: ⟨Ŵ_A, Ŵ_B⟩ against ⟨W_A, W_B⟩."""
        zero = torch.zeros_like(cross.value)
        n_a, n_b = (self.shared_norm_sq.get(layer, zero).to(cross.value.dtype).clamp(min=0).sqrt() for layer in (a, b))
        d_a, d_b = (self.shared_errors.get(layer, zero).to(cross.value.dtype) for layer in (a, b))
        slack = cross.error + d_a * n_a + d_b * n_b
        if materialized:
            slack = slack + d_a * n_b + (n_a + d_a) * d_b
        self.slack_sq.append(2 * slack)

    def result(self, batch: int, device=None):
        """(‖ĝ_b‖², U_b): the squared norms [B] (the sum of the terms, the roots squared and the packed buffers'
        norms) and their rounding upper bound U_b = √(‖ĝ_b‖² + Q_b) + R_b [B] (``None`` when nothing was noted)."""
        if self.packed is not None:
            self.packed.finish()
            self.roots.extend(self.packed.norms())
            if self.param_terms is not None:
                self._split({p: norm.square() for p, norm in self.packed.norms_by_param().items()})
        terms, roots = self.terms, self.roots
        acc = accumulation_dtype(*terms, *roots)
        device = device or (terms or roots or [torch.empty(0)])[0].device
        norm_sq = torch.zeros(batch, dtype=acc, device=device)
        if terms:  # squared norms from the norm kernels, one [B] per layer (stack promotes to acc)
            norm_sq = norm_sq + torch.stack(terms).sum(dim=0)
        if roots:  # ‖per-sample gradient‖ per parameter
            norm_sq = norm_sq + torch.stack(roots).square().sum(dim=0)
        radii = self.radii + ([self.shared_radius] if self.shared_radius is not None else [])
        if not radii and not self.slack_sq:
            return norm_sq, None
        return norm_sq, rounding.upper_bound(
            norm_sq, torch.stack(radii).square().sum(dim=0) if radii else None,
            torch.stack(self.slack_sq).sum(dim=0) if self.slack_sq else None,
        )

    def by_parameter(self, params: List[nn.Parameter], norm_sq: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        """‖∇_θ ℓ_b‖² [B] for each of ``params``, from the split terms (``by_param``; after `result`, whose
        ‖ĝ_b‖² ``norm_sq`` they sum to): zeros, like ``norm_sq``, for a parameter no term reached."""
        return {
            p: torch.stack(self.param_terms[p]).sum(dim=0).to(norm_sq.dtype) if p in self.param_terms
            else torch.zeros_like(norm_sq)
            for p in params
        }
