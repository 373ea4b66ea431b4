"""Registry of per-layer norm rules: ``@register_norm_rule(nn.Linear)`` on a `NormRule`.

A rule knows, for one layer family, from the layer input ``x`` and output gradient ``g``
(batch first, ``g`` the gradient of Σ_b ℓ_b):

* the per-sample squared gradient norm summed over the layer's trainable parameters, by any of
  the methods it lists in ``methods`` (``"flash"``, ``"gram"``, ``"per_sample"``, ``"exact"``);
* the clipped gradient Σ_b c_b ∇ℓ_b of each parameter (used by the one-pass ``flash_fuse``).

Families live one per file in this package and register on import.
"""

from __future__ import annotations

import abc
import importlib
import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from ..kernels import weighted_row_sum
from ..kernels.accumulation import accumulation_dtype

#: Every norm method a rule may list (the planner's vocabulary).
METHODS = ("flash", "gram", "per_sample", "exact")

_RULES: Dict[type, "NormRule"] = {}
#: Rules for layer classes recognised by what their ``forward`` computes (a library's many copies of one
#: class), as (matches(layer type), rule), consulted when no registered class is in the layer's MRO.
_MATCHED: List[Tuple[Callable[[type], bool], "NormRule"]] = []


class NormRule(abc.ABC):
    """The protocol of a layer family's norm rule (one instance per family, registered per layer type).

    Required: `per_sample_grads` (every rule can materialise per-sample gradients, B·|θ| memory).

    Optional, with defaults from the per-sample gradients:

    * `norm_sq` for the other ``methods`` it lists (``"flash"``, ``"gram"``, ``"exact"``);
    * `clipped_grads`, the clipped sum the one-pass mode assembles;
    * `norm_sq_by_param`, the squared norms split by parameter (Opacus's ``p._norm_sample``, on request);
    * `sizes`, the planner's (B, T, d, p): required when ``methods`` has ``"flash"`` or ``"gram"``;
    * `vector_params` / `vector_grads`: small *vector* parameters beside a large one (a Linear's
      bias beside its weight), kept per sample with the other per-sample gradients (one norm and one
      clipped sum for all of them); `norm_sq` and `clipped_grads` are then called with
      ``vectors=False``, for the remaining parameters only;
    * `join_uses`: a layer called k times in one forward pass as one call on its uses concatenated
      along the sequence (exact where the rule's algebra is a sum over positions, e.g. Σ_k G_kᵀX_k =
      [G_1; …; G_k]ᵀ[X_1; …; X_k]); without it the uses' per-sample gradients are summed;
    * `rounding_scale`: how large the rounding of the layer's per-sample gradient can be, for the
      clipping coefficient's allowance (`rounding`);
    * ``grouped_methods`` with `group_key` (and `clipped_grads_grouped` for ``flash``/``gram``): same-shaped
      layers counted and assembled as one (`flashnorm.grad_sample.layer_groups`);
    * `per_sample_dtype`, `supports`.

    ``backend`` (``"auto"``, ``"triton"``, ``"torch"``; ``None`` reads ``FLASHNORM_BACKEND``) is handed to the
    kernels a rule calls.
    """

    #: Methods this rule can compute norms with; the planner picks among them.
    methods: Tuple[str, ...] = ("per_sample",)
    #: The layer computes in autocast's lower precision (matmuls): a forward pre-hook hands it its input
    #: already cast, and that tensor, which autograd keeps too, is the X kept (not the input as it arrived).
    autocast_input: bool = False
    #: The rule's per-sample gradients cover the parameters of the layer's children too (they get no hooks).
    covers_children: bool = False
    #: The methods on the layer's call path whose code the rule's algebra assumes: ``forward`` and the helpers it
    #: calls (``_conv_forward`` for convolutions). A subclass serves by this rule only while each of them (and
    #: ``nn.Module``'s call machinery, `CALL_MACHINERY`) is the registered class's own; one that overrides
    #: any takes the exact fallback. Methods off the path (``_get_name``, ``extra_repr``, ``__init__``) never count.
    call_path: Tuple[str, ...] = ("forward",)
    #: The methods under which layers of this rule may be counted in groups (`flashnorm.grad_sample.layer_groups`):
    #: the rule's norms, per-sample gradients and `rounding_scale` are per sample over any batch of stacked
    #: captures; ``flash``/``gram`` groups also need `clipped_grads_grouped`.
    grouped_methods: Tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = set(cls.methods) - set(METHODS)
        if unknown:
            raise TypeError(f"{cls.__name__}.methods has unknown methods {sorted(unknown)}; valid: {', '.join(METHODS)}")
        if {"flash", "gram"} & set(cls.methods) and cls.sizes is NormRule.sizes:
            raise TypeError(f"{cls.__name__} lists flash/gram methods and must define sizes() for the planner")

    def supports(self, layer: nn.Module) -> Optional[str]:
        """``None`` when the rule handles ``layer``; otherwise why not (the layer falls back)."""
        return None

    def sizes(self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Tuple[int, int, int, int]:
        """(B, T, d, p) of the flattened product G_bᵀX_b, for the planner (rules with flash/gram methods)."""
        raise NotImplementedError(f"{type(self).__name__} has no flattened Linear problem")

    def join_uses(
        self, layer: nn.Module, xs: List[torch.Tensor], gs: List[torch.Tensor]
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(x, g) of one call equivalent to the k uses (xs[i], gs[i]) of the layer, or ``None`` (no such form)."""
        return None

    def vector_params(self, layer: nn.Module) -> List[nn.Parameter]:
        """Trainable parameters whose per-sample gradients are vectors cheap to form and keep (B·|θ|, far
        less than the layer's X and G), when the layer has other trainable parameters; none by default."""
        return []

    def vector_grads(
        self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, out: Dict[nn.Parameter, torch.Tensor], *,
        backend: Optional[str] = None,
    ) -> Dict[nn.Parameter, torch.Tensor]:
        """∇_θ ℓ_b for θ in `vector_params`, written into ``out[θ]`` ([B, *θ.shape], any float dtype)."""
        return {}

    def norm_sq(
        self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, method: str, vectors: bool = True, *,
        backend: Optional[str] = None,
    ) -> torch.Tensor:
        """Σ_params ‖∇_θ ℓ_b‖² per sample → [B] float32 (float64 for float64 inputs); with ``vectors=False``
        the parameters of `vector_params` are left out."""
        if method != "per_sample":
            raise ValueError(f"{type(self).__name__} has no method {method!r}")
        grads = self.per_sample_grads(layer, x, g, backend=backend)
        if not vectors:
            for p in self.vector_params(layer):
                grads.pop(p, None)
        return per_sample_norm_sq(grads)

    def norm_sq_by_param(
        self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, method: str, vectors: bool = True, *,
        backend: Optional[str] = None,
    ) -> Dict[nn.Parameter, torch.Tensor]:
        """`norm_sq` split by parameter, {θ: ‖∇_θ ℓ_b‖² [B]} (the values sum to `norm_sq`), for Opacus's
        per-parameter norms (``p._norm_sample``). A layer with one trainable parameter takes `norm_sq` by
        ``method``; otherwise the per-sample gradients (B·|θ| memory, one layer at a time)."""
        own = trainable_own_parameters(layer)
        if not vectors:
            own = [p for p in own if not any(p is v for v in self.vector_params(layer))]
        if len(own) == 1 and not self.covers_children:
            return {own[0]: self.norm_sq(layer, x, g, method, vectors, backend=backend)}
        grads = self.per_sample_grads(layer, x, g, backend=backend)
        if not vectors:
            for p in self.vector_params(layer):
                grads.pop(p, None)
        return {p: n.square() for p, n in zip(grads, per_sample_norms(grads))}

    def rounding_scale(self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Optional[Tuple[torch.Tensor, int]]:
        """(s, n): every computation of sample b's gradient sums n terms whose norms add up to at most s_b ([B]),
        so its rounding errs by at most γ_n·s_b (`rounding`); ``None`` when not modelled.
        For W_b = G_bᵀX_b: s_b = ‖X_b‖_F‖G_b‖_F and n = T."""
        return None

    @abc.abstractmethod
    def per_sample_grads(
        self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, out: Optional[Dict[nn.Parameter, torch.Tensor]] = None,
        *, backend: Optional[str] = None,
    ) -> Dict[nn.Parameter, torch.Tensor]:
        """∇_θ ℓ_b for each trainable parameter θ of the layer: {θ: [B, *θ.shape]}, in the layer's
        compute dtype (callers cast what they assemble to θ's dtype).

        ``out`` optionally maps parameters to [B, *θ.shape] tensors of `per_sample_dtype` to
        write into (and return); a rule may ignore it and return new tensors, which callers copy.
        """

    def per_sample_dtype(self, layer: nn.Module, x_dtype: torch.dtype, g_dtype: torch.dtype) -> Optional[torch.dtype]:
        """The dtype `per_sample_grads` returns for inputs of these dtypes; ``None`` when the rule
        cannot tell in advance (its per-sample gradients are then kept on their own)."""
        return None

    def clipped_grads(
        self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, vectors: bool = True, *,
        backend: Optional[str] = None,
    ) -> Dict[nn.Parameter, torch.Tensor]:
        """Σ_b c_b ∇_θ ℓ_b for each trainable parameter θ: {θ: θ.shape} (without those of
        `vector_params` when ``vectors=False``)."""
        return clipped_from_per_sample(self.per_sample_grads(layer, x, g, backend=backend), coef, backend=backend)

    def group_key(self, layer: nn.Module) -> Optional[tuple]:
        """What besides class and their captures' shapes and dtypes layers of one group share: their own parameters'
        names, shapes, dtypes and which are trainable (a rule whose algebra reads more of the layer adds it);
        ``None``: this layer is counted alone."""
        return tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in layer.named_parameters(recurse=False))

    def clipped_grads_grouped(
        self, layers: List[nn.Module], x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, *,
        backend: Optional[str] = None,
    ) -> Dict[nn.Parameter, torch.Tensor]:
        """`clipped_grads` of L layers at once from their captures stacked, x: [L·B, ...], g: [L·B, ...], and
        coef: [B]: {θ: θ.shape} over every layer's trainable parameters (rules with ``groups``)."""
        raise NotImplementedError(f"{type(self).__name__} does not group layers")


def register_norm_rule(layer_types, *, force: bool = False):
    """Class decorator: registers an instance of the decorated `NormRule` for ``layer_types``.

    Refuses to overwrite an existing rule unless ``force=True``.
    """
    types = layer_types if isinstance(layer_types, (list, tuple)) else (layer_types,)

    def decorator(rule_cls):
        rule = rule_cls()
        for layer_type in types:
            if layer_type in _RULES and not force:
                raise ValueError(f"a norm rule for {layer_type.__name__} is already registered; pass force=True")
            _RULES[layer_type] = rule
        return rule_cls

    return decorator


def register_norm_rule_matching(matches: Callable[[type], bool]):
    """Class decorator: registers an instance of the decorated `NormRule` for every layer class for which
    ``matches(cls)`` holds (e.g. a forward with the very bytecode of a reference class, `same_code`)."""

    def decorator(rule_cls):
        _MATCHED.append((matches, rule_cls()))
        return rule_cls

    return decorator


def same_code(cls: type, reference: type, methods: Tuple[str, ...] = ("forward",)) -> bool:
    """Whether each of ``methods`` of ``cls`` is ``reference``'s or has its very bytecode, constants and names (a
    copy of the same source, as Hugging Face's "Copied from" classes are): ``cls`` then computes what
    ``reference`` computes."""

    def same(name: str) -> bool:
        method, ref = getattr(cls, name, None), getattr(reference, name)
        if method is ref:
            return True
        code, ref_code = getattr(method, "__code__", None), ref.__code__
        return code is not None and all(
            getattr(code, attr) == getattr(ref_code, attr) for attr in ("co_code", "co_consts", "co_names", "co_varnames")
        )

    return all(same(name) for name in methods)


def copies_of(module: str, name: str, methods: Tuple[str, ...] = ("forward",), base: type = nn.Module):
    """matches(cls) for `register_norm_rule_matching`: ``cls`` is a subclass of ``base`` from the same library
    as ``module.name`` whose ``methods`` have that class's code (`same_code`; ``base`` keeps a ``super()`` call
    in the code meaning the same). The reference is imported when first asked; no match without its library."""

    def matches(cls: type) -> bool:
        if not cls.__module__.startswith(module.split(".")[0] + ".") or not issubclass(cls, base):
            return False
        try:
            reference = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return False
        return same_code(cls, reference, methods)

    return matches


#: ``nn.Module``'s call machinery: a subclass that overrides one of these runs something else than ``forward``.
CALL_MACHINERY = ("__call__", "_call_impl", "_wrapped_call_impl")


def keeps_call_path(cls: type, registered: type, rule: "NormRule") -> bool:
    """Whether every method on ``rule``'s call path (`NormRule.call_path`, plus `CALL_MACHINERY`) is,
    for ``cls``, the very function ``registered`` has: ``cls`` then computes what ``registered`` computes."""
    return all(getattr(cls, name, None) is getattr(registered, name, None) for name in (*rule.call_path, *CALL_MACHINERY))


def get_norm_rule(layer: nn.Module) -> Optional[NormRule]:
    """The rule registered for the nearest class in ``type(layer)``'s MRO, else the first matching rule
    (`register_norm_rule_matching`), or ``None``.

    A subclass inherits its parent's rule (a user's ``class MyLinear(nn.Linear)`` gets the Linear rule) only
    while it computes what the parent computes: every method on the rule's call path (``forward`` and the helpers
    it calls, `NormRule.call_path`, e.g. ``Conv2d._conv_forward``) must be the parent's own. A subclass that
    overrides one (weight standardisation in ``_conv_forward``) gets a matching rule or ``None`` (and so the exact
    per-sample fallback), since the parent's algebra need not hold for its code. Overriding methods off the path
    (``_get_name``, ``extra_repr``) keeps the rule.
    """
    for cls in type(layer).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            if keeps_call_path(type(layer), cls, rule):
                return rule
            break
    return next((rule for matches, rule in _MATCHED if matches(type(layer))), None)


def flatten_to_sequences(t: torch.Tensor) -> torch.Tensor:
    """[B, ..., n] → [B, T, n] (T = the product of the middle sizes; 1 for 2-D); 3-D tensors as they are."""
    return t if t.dim() == 3 else t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def trainable_own_parameters(layer: nn.Module) -> List[nn.Parameter]:
    """Trainable parameters the layer holds directly (not its children's)."""
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def per_sample_norms(grads: Dict[nn.Parameter, torch.Tensor]) -> List[torch.Tensor]:
    """‖grads[θ][b]‖ for each θ: a list of [B], accumulated in float32 (float64 for float64 grads)."""
    return [torch.linalg.vector_norm(gs.flatten(1), dim=1, dtype=accumulation_dtype(gs)) for gs in grads.values()]


def per_sample_norm_sq(grads: Dict[nn.Parameter, torch.Tensor]) -> torch.Tensor:
    """Σ_θ ‖grads[θ][b]‖² → [B]."""
    return torch.stack(per_sample_norms(grads)).square().sum(dim=0)


def clipped_from_per_sample(
    grads: Dict[nn.Parameter, torch.Tensor], coef: torch.Tensor, *, backend: Optional[str] = None
) -> Dict[nn.Parameter, torch.Tensor]:
    """Σ_b c_b grads[θ][b] for each θ, in float32 (float64 for float64 inputs): c is never rounded to a
    16-bit gradient dtype, which could scale a sample past the clipping bound."""
    return {
        p: weighted_row_sum(coef, gs.flatten(1), backend=backend).view(p.shape) for p, gs in grads.items()
    }


def iter_rules() -> Iterable[Tuple[Type[nn.Module], NormRule]]:
    """Registered (layer type, rule) pairs (rules registered by a match are in `all_rules`)."""
    return _RULES.items()


def all_rules() -> List[NormRule]:
    """Every registered rule instance, by class or by match."""
    return list({id(rule): rule for rule in [*_RULES.values(), *(rule for _, rule in _MATCHED)]}.values())
