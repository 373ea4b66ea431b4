"""Norm rules of the normalisation family: LayerNorm, RMSNorm, GroupNorm.

With x̂ the normalised input (recomputed from x with the layer's own eps) and G the output
gradient, the per-sample gradients are small (B × C), so they are materialised:

    ∇weight_b = Σ_{positions} G_b ⊙ x̂_b,      ∇bias_b = Σ_{positions} G_b

summed over every position that shares a parameter element (sequence positions for
LayerNorm/RMSNorm, spatial positions for GroupNorm's channels). Norm and clipped gradient follow.
A LayerNorm or RMSNorm over its last dimension with a trainable weight goes through
`affine_norm_grads` (one kernel on CUDA, its reference elsewhere).

Hugging Face's RMSNorms get the RMSNorm rule too, recognised by their code
(`copies_of`): ``LlamaRMSNorm`` and the classes copied from it (Mistral, Qwen2,
Phi-3, …), and ``GemmaRMSNorm``'s x̂ ⊙ (1 + w) and its copies (Gemma 2 and 3, Qwen3-Next, …).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.accumulation import accumulation_dtype, accumulation_dtype_of
from ..kernels.affine_norm import affine_norm_grads
from .registry import NormRule, copies_of, flatten_to_sequences, register_norm_rule, register_norm_rule_matching
from .rounding import frobenius_per_sample, unit_roundoff


class _AffineNormRule(NormRule):
    methods = ("per_sample",)
    grouped_methods = ("per_sample",)

    def normalized(self, layer, x):  # pragma: no cover - abstract
        """x̂ as the layer's forward forms it (in x's accumulation dtype, or as the layer rounds it)."""
        raise NotImplementedError

    def normalized_ndim(self, layer) -> int:
        """How many trailing dims of x are normalised together (``len(normalized_shape)``)."""
        return len(layer.normalized_shape)

    def epsilon(self, layer, dtype: torch.dtype) -> float:
        """The layer's ε (``None``: the machine epsilon of the accumulation ``dtype``, as ``F.rms_norm``)."""
        return layer.eps if layer.eps is not None else torch.finfo(dtype).eps

    def kernel_applies(self, layer, x) -> bool:
        """Whether `affine_norm_grads` computes this layer's x̂ for input x."""
        return True

    def reduce_dims(self, layer, x):
        """Dims of x (batch first) summed to bring a per-position term onto the parameter: every dim
        between the batch and the trailing normalised ones (LayerNorm, RMSNorm)."""
        return tuple(range(1, x.dim() - self.normalized_ndim(layer)))

    def per_sample_dtype(self, layer, x_dtype, g_dtype):
        return accumulation_dtype_of(x_dtype, g_dtype)

    def group_key(self, layer):
        """And how it normalises: the normalised shape, the groups, ε."""
        return (*super().group_key(layer), getattr(layer, "normalized_shape", None),
                getattr(layer, "num_groups", None), self.epsilon(layer, torch.float32))

    def rounding_scale(self, layer, x, g):
        """x̂ has mean square ≤ 1 per normalised group, so ‖X̂_b‖_F ≤ √(numel x_b): s_b = ‖G_b‖_F·(√numel + √n)
        bounds Σ over the n summed positions of ‖g ⊙ x̂‖ (weight) and ‖g‖ (bias)."""
        positions = math.prod(x.shape[d] for d in self.reduce_dims(layer, x))
        return frobenius_per_sample(g) * (math.sqrt(x[0].numel()) + math.sqrt(positions)), positions

    def join_uses(self, layer, xs, gs):
        """Positions normalised one by one (a 1-D ``normalized_shape``) concatenate along the sequence."""
        if self.normalized_ndim(layer) != 1:
            return None
        return (torch.cat([flatten_to_sequences(x) for x in xs], dim=1),
                torch.cat([flatten_to_sequences(g) for g in gs], dim=1))

    #: LayerNorm (True: subtract the mean) or RMSNorm (False) over the last dim: the one-launch kernel applies
    #: (`affine_norm_grads`); None: the general sums below.
    centered: Optional[bool] = None

    def per_sample_grads(self, layer, x, g, out=None, *, backend=None):
        weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        if (self.centered is not None and self.normalized_ndim(layer) == 1 and weight is not None and weight.requires_grad
                and self.kernel_applies(layer, x)):
            out = out or {}
            with_bias = bias is not None and bias.requires_grad
            rows = (flatten_to_sequences(x), flatten_to_sequences(g))
            w, b = affine_norm_grads(*rows, eps=self.epsilon(layer, accumulation_dtype(x, g)), center=self.centered,
                                     with_bias=with_bias,
                                     weight_out=out.get(weight), bias_out=out.get(bias) if with_bias else None,
                                     backend=backend)
            return {weight: w, bias: b} if with_bias else {weight: w}
        acc = accumulation_dtype(x, g)
        g = g.to(acc)
        dims = self.reduce_dims(layer, x)
        out = out or {}
        grads = {}
        if weight is not None and weight.requires_grad:
            grads[weight] = _sum_onto(g * self.normalized(layer, x).to(acc), dims, weight, out.get(weight))
        if bias is not None and bias.requires_grad:
            grads[bias] = _sum_onto(g, dims, bias, out.get(bias))
        return grads


def _sum_onto(term: torch.Tensor, dims: tuple, param: nn.Parameter, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Σ over ``dims`` of term: [B, ...] → [B, *param.shape], written into ``out`` when given."""
    batch = term.shape[0]
    if out is None:
        return (term.sum(dim=dims) if dims else term).reshape(batch, *param.shape)
    if dims:
        kept = [n for i, n in enumerate(term.shape) if i not in dims]
        torch.sum(term, dim=dims, out=out.view(kept))
    else:
        out.copy_(term.reshape(out.shape))
    return out


def _over_normalized_shape(normalize, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``normalize(x, layer.normalized_shape, eps=layer.eps)`` (``F.layer_norm`` or ``F.rms_norm``) in x's
    accumulation dtype."""
    return normalize(x.to(accumulation_dtype(x)), layer.normalized_shape, eps=layer.eps)


@register_norm_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    centered = True

    def normalized(self, layer, x):
        return _over_normalized_shape(F.layer_norm, layer, x)


@register_norm_rule(nn.RMSNorm)
class RMSNormRule(_AffineNormRule):
    centered = False

    def normalized(self, layer, x):
        return _over_normalized_shape(F.rms_norm, layer, x)


class _HFRMSNormRule(RMSNormRule):
    """What ``transformers``' RMSNorms share: a 1-D weight over the last dim, ε in the attribute ``eps_attribute``."""

    eps_attribute = "eps"

    def supports(self, layer):
        weight = getattr(layer, "weight", None)
        if not isinstance(getattr(layer, self.eps_attribute, None), (int, float)) or weight is None or weight.dim() != 1:
            return f"it has no 1-D weight and float {self.eps_attribute}"
        return None

    def normalized_ndim(self, layer) -> int:
        return 1

    def epsilon(self, layer, dtype):
        return getattr(layer, self.eps_attribute)


@register_norm_rule_matching(copies_of("transformers.models.llama.modeling_llama", "LlamaRMSNorm"))
class HFRMSNormRule(_HFRMSNormRule):
    """``transformers``' RMSNorm: y = w ⊙ cast(x̂) with x̂ = x₃₂ · rsqrt(mean(x₃₂²) + ε) computed in float32
    whatever x's dtype, cast back to x's dtype (ε = ``variance_epsilon``), so ∇w_b = Σ_t g_t ⊙ cast(x̂_t).

    For float32 x the cast is the identity and the one-pass kernel applies; otherwise x̂ is formed as the
    layer forms it (float32, then rounded to x's dtype: bf16 for a bf16 model, exact for float64)."""

    eps_attribute = "variance_epsilon"

    def kernel_applies(self, layer, x) -> bool:
        return x.dtype == torch.float32

    def normalized(self, layer, x):
        h = x.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)).to(x.dtype)

    def rounding_scale(self, layer, x, g):
        """As RMSNorm's, with ‖cast(x̂)‖ ≤ (1 + u)·‖x̂‖ for the unit roundoff u of x's dtype."""
        scale, positions = super().rounding_scale(layer, x, g)
        return scale * (1.0 + torch.finfo(x.dtype).eps), positions


@register_norm_rule_matching(
    copies_of("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", methods=("forward", "_norm"))
)
class HFGemmaRMSNormRule(_HFRMSNormRule):
    """``transformers``' Gemma RMSNorm: y = cast(x̂ ⊙ (1 + w)) with x̂ = x₃₂ · rsqrt(mean(x₃₂²) + ε) in float32
    whatever x's dtype (ε = ``eps``), so ∇w_b = Σ_t g_t ⊙ x̂_t with x̂ unrounded: the affine-norm kernel, which
    normalises in float32, for float32 and 16-bit x; for float64 x the layer's own ``_norm`` in float32."""

    def kernel_applies(self, layer, x) -> bool:
        return x.dtype != torch.float64

    def normalized(self, layer, x):
        return layer._norm(x.float())

    def rounding_scale(self, layer, x, g):
        """As RMSNorm's. The layer forms its weight's gradient in float32 whatever x's dtype, so for float64 x the
        scale is widened by float32's unit roundoff over float64's: the allowance then covers float32 rounding."""
        scale, positions = super().rounding_scale(layer, x, g)
        if x.dtype == torch.float64:
            scale = scale * (unit_roundoff(torch.float32) / unit_roundoff(torch.float64))
        return scale, positions


@register_norm_rule(nn.GroupNorm)
class GroupNormRule(_AffineNormRule):
    def normalized(self, layer, x):
        acc = accumulation_dtype(x)
        return F.group_norm(x.to(acc), layer.num_groups, eps=layer.eps)

    def reduce_dims(self, layer, x):
        return tuple(range(2, x.dim()))
