"""Same-shaped layers counted and assembled as one: a norm launch and an assembly GEMM per group, not per layer.

At short sequences a one-pass step costs what the host spends issuing it, about thirty operations per Linear
layer (its norm, the bias term, the rounding scale, the assembly GEMM and the casts around them) and a kernel
launch or five per LayerNorm. Layers of one rule and one class whose captures have the same shapes and dtypes
(GPT-2's twelve ``c_attn`` or twelve ``ln_1``, Llama's sixteen ``q_proj``) are counted together instead: their
inputs and output gradients are stacked into one batch of L·B samples, X: [L·B, ..., d] and G: [L·B, ..., p].

* ``flash``/``gram`` (the Linear family): the per-sample norm terms, viewed [L, B] and summed over the L layers,
  are the group's [B] term; the writer assembles all L clipped gradients with one batched GEMM
  (`NormRule.clipped_grads_grouped`, `KeptGroup`).
* ``per_sample`` (LayerNorm, RMSNorm, GroupNorm): one call forms the L layers' per-sample gradients, [L·B, ...] per
  parameter name; their squared norms summed over the layers are the group's term, and the writer forms the L
  clipped sums Σ_b c_b g_b from the very same tensors with one batched product per parameter name
  (`KeptGroupGrads`): like the packed buffers they replace there, the norm and the applied sum read one tensor.

Each sample's per-layer sums are the same sums as ungrouped, over the same rows: only the launches are shared.

A layer is grouped when its rule can under its method (``NormRule.grouped_methods``, `NormRule.group_key` not
``None``), the writer assembles from what the pass kept
(``ClippedGradientWriter.assembles_groups``: the one-pass mode keeps X and G until the write anyway), the layer
has one use and shares no parameter, norms are not split by parameter,
the kernels are not forced to Triton (``backend="triton"``: the group's assembly is one cuBLAS batched GEMM in
float32), its X and G together hold at most `GROUP_MAX_ELEMENTS` elements (beyond that the GPU's work, not the
host's, sets the step's time, and the stacking copy would add to it), and, on CUDA, float32 matmuls may not use
tf32 (``torch.backends.cuda.matmul.allow_tf32``): the GEMM's operand c ⊙ X (or c ⊙ G) is float32, which tf32 would
round to 10 bits, far beyond the clipping coefficient's float32 rounding allowance, where the ungrouped fused kernel
applies c in float32 to exact products.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from ..kernels.backend import tf32_enabled
from .capture import HookedLayer

#: Largest X and G of one layer (elements, together) that is grouped; larger layers are counted one by one.
GROUP_MAX_ELEMENTS = 1 << 20


class LayerGroup:
    """Layers counted as one: their captures, stacked once every member's output gradient is in.

    Args:
        layers: the members, in forward order.
        method: their norm method.
    """

    def __init__(self, layers: List[HookedLayer], method: str):
        self.layers = layers
        self.method = method
        self._arrived: Dict[HookedLayer, Tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, layer: HookedLayer, x: torch.Tensor, g: torch.Tensor) -> bool:
        """Holds one member's (X, G); returns whether every member's are in."""
        self._arrived[layer] = (x, g)
        return len(self._arrived) == len(self.layers)

    @property
    def pending(self) -> bool:
        """Some member's captures are held (a pass that reached only part of the group leaves them)."""
        return bool(self._arrived)

    def take(self) -> Tuple[List[HookedLayer], torch.Tensor, torch.Tensor]:
        """(members that arrived, X stacked [L·B, ...], G stacked [L·B, ...]), in forward order; the group is empty
        afterwards."""
        members = [layer for layer in self.layers if layer in self._arrived]
        pairs = [self._arrived[layer] for layer in members]
        self._arrived = {}
        if len(pairs) == 1:
            return members, pairs[0][0], pairs[0][1]
        return members, torch.cat([x for x, _ in pairs]), torch.cat([g for _, g in pairs])


#: Memberships kept per hooked model (distinct capture signatures: Poisson batch sizes, sequence lengths).
PLANS_KEPT = 64


def plan_layer_groups(captured, method_of, plans: Optional[dict] = None) -> Dict[HookedLayer, LayerGroup]:
    """Before the norm pass: each grouped layer's `LayerGroup` (see the module docstring), groups of two layers or
    more. ``captured``: (layer, `LayerCapture`) in forward order; ``method_of(layer, x, g_shape, g_dtype)``: the
    planner's norm method. ``plans`` (the hooked model's, rebuilt with it when ``requires_grad`` changes) keeps the
    memberships per capture signature (each layer's uses, X's shape, dtype and device, G's shape and dtype, and
    whether float32 matmuls may use tf32), so a step of a known shape plans nothing; its groups are new."""
    tf32 = tf32_enabled()
    if plans is None:
        memberships = _memberships(captured, method_of, tf32)
    else:
        signature = (tf32, *((layer.index, len(c.xs), None if c.x is None else (c.x.shape, c.x.dtype, c.x.device),
                              c.out_meta) for layer, c in captured))
        memberships = plans.get(signature)
        if memberships is None:
            if len(plans) >= PLANS_KEPT:
                plans.clear()
            memberships = plans[signature] = _memberships(captured, method_of, tf32)
    return {layer: group for layers, method in memberships
            for group in (LayerGroup(layers, method),) for layer in layers}


def _memberships(captured, method_of, tf32: bool) -> List[Tuple[List[HookedLayer], str]]:
    """(layers, method) of every group of two layers or more."""
    by_key: Dict[tuple, List[HookedLayer]] = {}
    methods: Dict[tuple, str] = {}
    for layer, capture in captured:
        rule, x = layer.rule, capture.x
        if (not rule.grouped_methods or len(capture.xs) != 1 or layer.shared or not layer.batch_first or x is None
                or x.shape[0] == 0 or capture.out_meta is None or (tf32 and x.is_cuda)):
            continue
        g_shape, g_dtype = capture.out_meta
        if x.numel() + math.prod(g_shape) > GROUP_MAX_ELEMENTS:
            continue
        method, shared_key = method_of(layer, x, g_shape, g_dtype), rule.group_key(layer.module)
        if method not in rule.grouped_methods or shared_key is None:
            continue
        key = (type(layer.module), method, tuple(x.shape), x.dtype, tuple(g_shape), g_dtype, shared_key)
        by_key.setdefault(key, []).append(layer)
        methods[key] = method
    return [(layers, methods[key]) for key, layers in by_key.items() if len(layers) > 1]
