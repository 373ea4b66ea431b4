"""The backward side of a clipping step: each hooked layer's per-sample squared norms from its captures.

A layer's uses are counted once all their output gradients G (tap callbacks) and inputs X (the forward, or
the recompute of activation checkpointing) are in: one use as it is; k uses joined into one call where the
rule can (:meth:`~flashnorm.norms.NormRule.join_uses`), else their per-sample gradients summed. A layer
sharing a parameter with another (tied weights) is counted like any other, and the cross term
2⟨∇_θ^A, ∇_θ^B⟩ (:mod:`flashnorm.norms.shared`) is added once both are counted. Uses that never received
a gradient (outputs that do not reach the loss) contribute nothing, exactly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels.accumulation import accumulation_dtype
from ..norms import rounding
from ..norms.planner import choose
from ..norms.registry import per_sample_norms
from ..norms.shared import cross_term, per_sample_dot
from .capture import HookedLayer
from .kept import KeptInputs, KeptPacked, KeptPerSample


class NormPassHooks:
    """Mixin of the grad-sample module: the gradient taps' callback, the per-layer norm terms, their sum and
    Opacus's accessors of the per-sample norms.

    The host provides ``layers``, ``passes``, ``backend``, ``norm_algorithm``, ``norm_method``, ``_step``,
    ``_capturing``, ``_in_workflow``, ``_packed``, ``_norm_terms``, ``_norm_roots``, ``_radii``,
    ``_shared_radius``, ``_slack_sq``, ``_shared_groups``, ``_shared_scales``, ``_norm_sq``, ``_norm_bound``, ``max_grad_norm`` and ``_batch_first``.
    """

    def _capture_backward(self, layer: HookedLayer, grad_output: torch.Tensor, key) -> None:
        step, use = key
        if not self._capturing and self._in_workflow:
            return  # the second pass of a two-pass step: norms are done
        if step != self._step or use >= len(layer.gs):
            if not self._capturing:
                return  # a plain backward of an older forward: nothing to record
            # Never skip a layer: a missing norm term would under-clip and break the guarantee.
            raise RuntimeError(
                f"Layer '{layer.name}' is back-propagated from a forward pass other than the model's last one. "
                "Run the forward and the DP loss's backward in pairs: loss = criterion(model(x), y); loss.backward()."
            )
        if not self._capturing:
            self._plain_backward = True
            self._step_used = True
        layer.gs[use] = self._batch_first(grad_output.detach())
        layer.arrived += 1
        if not self._taps_reached:  # (written once: an nn.Module attribute write costs microseconds)
            self._taps_reached = True
        self._count_if_complete(layer)

    def _count_if_complete(self, layer: HookedLayer) -> None:
        if layer.arrived == len(layer.xs) and all(x is not None for x in layer.xs):
            self._count_layer(layer)

    def _count_layer(self, layer: HookedLayer) -> None:
        """Norm terms of the layer's uses that received a gradient (kept for the one-pass assembly)."""
        if len(layer.xs) == 1 and layer.xs[0] is not None and layer.gs[0] is not None:  # one use: the usual case
            x, g = layer.xs[0], layer.gs[0]
            layer.xs, layer.gs, layer.arrived = [], [], 0
            if x.shape[0] == 0:
                return
            kept = self._count_joined(layer, x, g)
            if layer.shared:
                self._shared_inputs[layer] = (x, g)
            if self.passes == 1 and self._capturing:
                layer.kept = kept
            return
        uses = [(x, g) for x, g in zip(layer.xs, layer.gs) if g is not None]
        missing = [i for i, (x, g) in enumerate(zip(layer.xs, layer.gs)) if g is not None and x is None]
        layer.xs, layer.gs, layer.arrived = [], [], 0
        if missing:
            raise RuntimeError(
                f"Layer '{layer.name}' received its output gradient but its input was never captured (use "
                f"{missing[0]}): activation checkpointing that FlashNorm does not recognise. No step was taken."
            )
        if not uses or uses[0][0].shape[0] == 0:
            return
        x, g = uses[0] if len(uses) == 1 else (layer.rule.join_uses(layer.module, *map(list, zip(*uses))) or (None, None))
        if x is None:
            kept = self._per_sample_sum(layer, uses)
        else:
            kept = self._count_joined(layer, x, g)
            if layer.shared:
                self._shared_inputs[layer] = (x, g)
        if self.passes == 1 and self._capturing:
            layer.kept = kept

    def _count_joined(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor):
        method = self._method(layer, x, g.shape, g.dtype, g)
        if method == "per_sample":
            return self._per_sample(layer, x, g)
        with_vectors = layer.shared or not self._vectors_to_packed(layer, x, g)
        self._norm_terms.append(layer.rule.norm_sq(layer.module, x, g, method, vectors=with_vectors, backend=self.backend))
        self._add_radius(layer, self._note_rounding(layer, x, g, method))
        return KeptInputs(method, x, g, with_vectors)

    def _note_rounding(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor, method: str) -> Optional[torch.Tensor]:
        """The layer's share of the clipping coefficient's rounding allowance (:mod:`~flashnorm.norms.rounding`):
        returns its radius r = (γ_norm + γ_applied)·s over the two computations of its per-sample gradient (``None``
        where the one-pass mode applies the very per-sample gradients it took the norm of, or the rule has no
        model), notes the Gram form's γ_G·s², and keeps (s, γ, n) of a layer sharing a parameter for the cross
        terms."""
        consistent = method == "per_sample" and self.passes == 1
        scale = None if consistent and not layer.shared else layer.rule.rounding_scale(layer.module, x, g)
        if scale is None:
            return None
        s, terms = scale
        gamma = rounding.gamma(terms, x.shape[0], g.dtype)
        if layer.shared:  # a layer's uses add up (a multi-use layer is noted once per use)
            kept = self._shared_scales.get(layer)
            self._shared_scales[layer] = (s, gamma, terms) if kept is None else (
                kept[0] + s, max(kept[1], gamma), kept[2] + terms)
        if consistent:
            return None
        if method == "gram":  # the norm's error is γ_G·s² (squared domain); only the applied sum has a radius
            batch, steps, d, p = layer.rule.sizes(layer.module, x, g)
            gram_dtype = torch.float64 if rounding.gram_in_float64(steps, g.dtype) else g.dtype
            self._slack_sq.append(s.square().mul_(rounding.gram_gamma(steps, d, p, gram_dtype)))
            return s * gamma
        return s * (2 * gamma)

    def _add_radius(self, layer: HookedLayer, radius: Optional[torch.Tensor]) -> None:
        """Radii of different parameters add in quadrature (their errors lie on different coordinates); those of
        layers sharing a parameter, and of one layer's uses, add linearly (theirs fall on the same ones)."""
        if radius is None:
            return
        if layer.shared:
            self._shared_radius = radius if self._shared_radius is None else self._shared_radius + radius
        else:
            self._radii.append(radius)

    def _per_sample_sum(self, layer: HookedLayer, uses) -> KeptPerSample:
        """Σ over the uses of the per-sample gradients, where the rule cannot join the uses (B·|θ| memory)."""
        total, radii = {}, []
        for x, g in uses:
            for p, gs in layer.rule.per_sample_grads(layer.module, x, g, backend=self.backend).items():
                total[p] = gs.clone() if p not in total else total[p].add_(gs)
            radius = self._note_rounding(layer, x, g, "per_sample")
            if radius is not None:
                radii.append(radius)
        self._add_radius(layer, sum(radii) if radii else None)  # the uses' errors fall on the same coordinates
        self._norm_roots.extend(per_sample_norms(total))
        if layer.shared:
            self._shared_grads[layer] = total
        return KeptPerSample(total)

    def _finish_pass(self) -> None:
        """After the backward: layers whose uses did not all receive a gradient, then the cross terms of
        parameters shared by two layers."""
        for layer in self.layers:
            if layer.arrived:
                self._count_layer(layer)
            else:
                layer.xs, layer.gs = [], []
        try:
            for param, sharing in self._shared_groups:
                counted = [layer for layer in sharing if layer in self._shared_inputs or layer in self._shared_grads]
                for i, a in enumerate(counted):
                    for b in counted[i + 1:]:
                        self._norm_terms.append(2 * self._cross(a, b, param))
                        self._note_cross_rounding(a, b)
        finally:
            self._shared_inputs, self._shared_grads, self._shared_scales = {}, {}, {}

    def _note_cross_rounding(self, a: HookedLayer, b: HookedLayer) -> None:
        """The cross term 2⟨Ŵ_A, Ŵ_B⟩ errs by ≤ 2·(γ_cross + 2γ_A + 2γ_B)·s_A·s_B: its own rounding over the
        n_A·n_B products it sums (γ_cross ≈ γ_A·√n_B), and each layer's radius against the other's gradient;
        added to the squared-domain allowance."""
        if a in self._shared_scales and b in self._shared_scales:
            (s_a, gamma_a, n_a), (s_b, gamma_b, n_b) = self._shared_scales[a], self._shared_scales[b]
            gamma_cross = max(gamma_a * math.sqrt(n_b), gamma_b * math.sqrt(n_a))
            self._slack_sq.append((2 * (gamma_cross + 2 * gamma_a + 2 * gamma_b)) * s_a * s_b)

    def _cross(self, a: HookedLayer, b: HookedLayer, param) -> torch.Tensor:
        """⟨∇_θ^A, ∇_θ^B⟩ per sample for θ = ``param`` used by layers a and b."""
        grads_a, grads_b = self._shared_grads.get(a), self._shared_grads.get(b)
        if grads_a is None and grads_b is None:
            return cross_term(a.rule, a.module, *self._shared_inputs[a], b.rule, b.module, *self._shared_inputs[b],
                              param, backend=self.backend)
        if grads_a is None:
            grads_a = a.rule.per_sample_grads(a.module, *self._shared_inputs[a], backend=self.backend)
        if grads_b is None:
            grads_b = b.rule.per_sample_grads(b.module, *self._shared_inputs[b], backend=self.backend)
        return per_sample_dot(grads_a[param], grads_b[param])

    def _method(self, layer: HookedLayer, x: torch.Tensor, g_shape, g_dtype, g: Optional[torch.Tensor] = None) -> str:
        """The layer's norm method for these shapes (planned once per new shape; ``g`` may be absent). Layers
        sharing a parameter keep their X and G (no per-sample gradients) unless forced."""
        key = (x.shape, g_shape, g_dtype)
        if layer.plan is None or layer.plan[0] != key:
            if g is None:
                g = torch.empty(g_shape, dtype=g_dtype, device="meta")
            method = choose(
                layer.rule, layer.module, x, g, base=self.norm_algorithm, fused=self.passes == 1 and not layer.shared,
                override=self.norm_method, name=layer.name,
            )
            layer.plan = (key, method)
        return layer.plan[1]

    def _per_sample(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor):
        """The layer's per-sample gradients, packed where they have room; their norms go to the terms.

        Returns what the one-pass assembly keeps: :class:`KeptPacked` or :class:`KeptPerSample`.
        """
        packed = self._packed
        slots = {p: slot for p in layer.params if (slot := packed.slot(p)) is not None} if packed is not None else {}
        # (a slot's buffer is allocated here, when the pass first reaches it)
        grads = layer.rule.per_sample_grads(layer.module, x, g, out=slots or None, backend=self.backend)
        self._add_radius(layer, self._note_rounding(layer, x, g, "per_sample"))
        separate = {}
        for p, gs in grads.items():
            slot = slots.get(p)
            if slot is None or not packed.store(p, gs):
                separate[p] = gs
        if layer.shared:
            self._shared_grads[layer] = grads
        if separate:  # norms squared and summed once, after the pass; the rest is in the packed norms
            self._norm_roots.extend(per_sample_norms(separate))
            return KeptPerSample(separate)
        return KeptPacked()

    def _vectors_to_packed(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor) -> bool:
        """Writes the layer's vector parameters' per-sample gradients into their packed slots (the rest of
        the layer takes a norm kernel); ``False`` when they have no room there (the rule then counts them)."""
        slots = {p: self._packed.slot(p) for p in layer.vectors} if self._packed is not None else {}
        if not slots or any(slot is None for slot in slots.values()):
            return False
        for p, gs in layer.rule.vector_grads(layer.module, x, g, out=slots, backend=self.backend).items():
            self._packed.store(p, gs)
        return True

    def _summed_norm_sq(self, batch: int, device=None) -> torch.Tensor:
        """Σ of the pass's norm terms ([B] squared norms per layer and cross term, [B] norms per parameter)."""
        terms, roots = self._norm_terms, self._norm_roots
        self._norm_terms, self._norm_roots = [], []
        acc = accumulation_dtype(*terms, *roots)
        device = device or (terms or roots or [torch.empty(0)])[0].device
        norm_sq = torch.zeros(batch, dtype=acc, device=device)
        if terms:  # squared norms from the norm kernels, one [B] per layer (stack promotes to acc)
            norm_sq = norm_sq + torch.stack(terms).sum(dim=0)
        if roots:  # ‖per-sample gradient‖ per parameter
            norm_sq = norm_sq + torch.stack(roots).square().sum(dim=0)
        return norm_sq

    def _rounding_bound(self, norm_sq: torch.Tensor) -> Optional[torch.Tensor]:
        """U_b = √(‖ĝ_b‖² + Q_b) + R_b from the pass's noted allowances ([B]; ``None`` when none was noted)."""
        radii, slack_sq = self._radii, self._slack_sq
        if self._shared_radius is not None:
            radii = radii + [self._shared_radius]
        self._radii, self._slack_sq, self._shared_radius = [], [], None
        if not radii and not slack_sq:
            return None
        return rounding.upper_bound(
            norm_sq, torch.stack(radii).square().sum(dim=0) if radii else None,
            torch.stack(slack_sq).sum(dim=0) if slack_sq else None,
        )

    # -- Opacus-compatible accessors -------------------------------------------------------------
    def record_norm_sq(self, norm_sq: torch.Tensor, bound: Optional[torch.Tensor] = None) -> None:
        """Records the step's squared per-sample gradient norms [B] and their rounding upper bound U [B] (or
        ``None``); the norms follow from them when asked."""
        self._norm_sq, self._norm_bound = norm_sq, bound
        self._per_sample_gradient_norms = None

    def get_norm_sample(self) -> torch.Tensor:
        """Per-sample gradient norms ‖g_b‖ of the last norm pass (or plain backward): [B]."""
        if self._plain_backward:
            self._plain_backward = False
            self._finish_pass()
            norm_sq = self._summed_norm_sq(self._batch_size or 0)
            self.record_norm_sq(norm_sq, self._rounding_bound(norm_sq))
        if self._norm_sq is None:
            raise AttributeError("No norms yet: call backward on the loss from the DP criterion first.")
        norms = self._norm_sq.clamp(min=0).sqrt()  # (an estimate cancelled below 0 is ≈ 0; its bound clips it)
        self.per_sample_gradient_norms = norms
        return norms

    def get_clipping_coef(self) -> torch.Tensor:
        """c_b = min(1, C / (‖g_b‖ + 1e-6), (1 + τ)·C / U_b) (:func:`flashnorm.norms.rounding.clipping_coef`): [B]."""
        self.get_norm_sample()
        return rounding.clipping_coef(self._norm_sq, self._norm_bound, self.max_grad_norm)

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
