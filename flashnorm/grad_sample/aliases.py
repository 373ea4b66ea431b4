"""Parameter aliases: every step's check that no parameter reaches the loss outside its own layer, at no cost.

A hooked layer's norm rule sees only what happens inside the layer's forward. A parameter read anywhere else
(``F.linear(h, layer.weight)``) sends gradient along a path no norm measures: the two-pass modes would apply it
unclipped, the one-pass mode would drop it. So, while a hooked layer runs, its registrations of each parameter p
(``module._parameters[name]``) point to an *alias* a_p: a leaf ``nn.Parameter`` sharing p's storage and version
counter; everywhere else they point to p. Autograd then ends every edge made inside a layer at a_p's gradient
accumulator and every edge made outside at p's. Asking the norm pass for the gradients of the parameters
themselves (``torch.autograd.grad(..., taps + params, allow_unused=True)``) costs nothing while no such edge
exists (an unused input is never computed), and returns a gradient exactly where one does: the step then refuses
before any parameter changes.

A backward that accumulates into a_p.grad (the second pass of ``ghost``/``flash``, a plain ``loss.backward()``,
a step of one sample) moves it into p.grad at once, so ``p.grad`` is what plain autograd would leave; where p
has hooks of its own (``register_hook``, ``register_post_accumulate_grad_hook``) the gradient goes through p's
accumulator, so they run as they would without FlashNorm.

Aliases are cached per parameter and rebuilt when the parameter's data is replaced (``p.data = ...``,
``model.to(...)``). Under DDP they work as on one process (FlashNorm runs DDP's forward under ``no_sync``, so
DDP's gradient hooks are idle and the DP optimizer reduces). Under FSDP2 the registrations hold each parameter's
unsharded counterpart while its unit runs: that is what gets an alias, and whose gradient the norm pass asks
for; the moved gradient lands in the unsharded parameter's ``.grad`` before FSDP2's post-backward reads it
(autograd runs gradient accumulators as soon as they are ready).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn


#: The attribute an alias carries: the parameter (or counterpart) it stands for.
ALIAS_OF = "_flashnorm_alias_of"


class _AliasCache(dict):
    """id(p) → (p, a_p); a deep copy of a wrapped model starts with none (its parameters are new tensors)."""

    def __deepcopy__(self, memo):
        return type(self)()


class ParameterAliases:
    """The alias slots of hooked layers: (module, name, p) for each registration of a layer parameter in the
    modules whose forward the layer covers.

    Args:
        slots: per layer key, its list of (module, name, parameter).
        counterpart: the tensor that stands for a parameter in the registrations while its layer runs, when it is
            not the parameter itself (FSDP2's unsharded parameter), else ``None``.
    """

    def __init__(self, slots: Dict[object, List[Tuple[nn.Module, str, nn.Parameter]]],
                 counterpart: Optional[Callable[[nn.Parameter], Optional[nn.Parameter]]] = None):
        self._slots = slots
        self._counterpart = counterpart
        self._cache = _AliasCache()
        self._entered: Dict[object, int] = {}  # layer key → nesting depth of its forward (a layer calling itself)
        self._swapped: Dict[object, list] = {}  # layer key → the slots its outermost call pointed to aliases
        self._moving = True  # alias gradients go into p.grad (else they are dropped: the reentrant norm pass)

    def enter(self, key) -> None:
        """Points the layer's registrations to the aliases (forward pre-hook). Registrations that hold neither the
        parameter nor its counterpart right now are left alone: ``torch.func.functional_call`` (the per-sample
        fallback re-running the layer) has put its own tensors there."""
        depth = self._entered.get(key, 0)
        self._entered[key] = depth + 1
        if depth == 0:
            swapped = []
            for module, name, p in self._slots.get(key, ()):
                current = module._parameters.get(name)
                if current is not None and (current is p or current is self.original(p)):
                    module._parameters[name] = self._alias(current)
                    swapped.append((module, name, current))
                elif self._replaced(current, p):
                    self._entered.pop(key, None)
                    for undo_module, undo_name, original in swapped:
                        undo_module._parameters[undo_name] = original
                    _refuse_replaced(module, name)
            self._swapped[key] = swapped

    def check_registrations(self) -> None:
        """Raises when a registration holds another ``nn.Parameter`` than the one wrapped (see `enter`); for
        steps whose hooks are detached (one sample), where `enter` does not run."""
        for slots in self._slots.values():
            for module, name, p in slots:
                current = module._parameters.get(name)
                if current is not p and current is not self.original(p) and self._replaced(current, p):
                    _refuse_replaced(module, name)

    def _replaced(self, current, p: nn.Parameter) -> bool:
        """``current``, found where ``p`` is registered, is another ``nn.Parameter``: neither p, its counterpart nor
        an alias of either (another wrapper of the same model points the registration to its alias)."""
        if not isinstance(current, nn.Parameter):
            return False  # (functional_call's tensors)
        aliased = getattr(current, ALIAS_OF, None)
        return aliased is None or (aliased is not p and aliased is not self.original(p))

    def leave(self, key) -> None:
        """Points the layer's registrations back to the parameters (at the layer's forward hook)."""
        depth = self._entered.get(key, 0)
        if depth > 1:
            self._entered[key] = depth - 1
            return
        self._entered.pop(key, None)
        for module, name, p in self._swapped.pop(key, ()):
            module._parameters[name] = p

    def original(self, p: nn.Parameter) -> nn.Parameter:
        """The tensor whose gradient accumulator an outside read of ``p`` reaches: p, or its counterpart."""
        other = self._counterpart(p) if self._counterpart is not None else None
        return p if other is None else other

    def leave_all(self) -> None:
        """Restores every registration (a layer's forward raised before its forward hook)."""
        for key in list(self._entered):
            self._entered[key] = 1
            self.leave(key)

    @contextlib.contextmanager
    def dropping_gradients(self) -> Iterator[None]:
        """Alias gradients are dropped instead of moved into p.grad (a norm pass that must run as a full backward)."""
        self._moving = False
        try:
            yield
        finally:
            self._moving = True

    def _alias(self, p: nn.Parameter) -> nn.Parameter:
        cached = self._cache.get(id(p))
        if cached is not None and cached[0] is p:
            alias = cached[1]
            if alias.data_ptr() == p.data_ptr() and alias.shape == p.shape and alias.dtype == p.dtype:
                return alias
        alias = nn.Parameter(p.detach(), requires_grad=True)
        setattr(alias, ALIAS_OF, p)
        alias.register_post_accumulate_grad_hook(self._mover(p))
        self._cache[id(p)] = (p, alias)
        return alias

    def _mover(self, p: nn.Parameter):
        def move(alias: torch.Tensor) -> None:
            grad, alias.grad = alias.grad, None
            if not self._moving or grad is None:
                return
            if p._backward_hooks or p._post_accumulate_grad_hooks:
                torch.autograd.backward(p, grad)  # through p's accumulator: its own hooks run as in plain autograd
            elif p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)

        return move


def _refuse_replaced(module: nn.Module, name: str) -> None:
    raise RuntimeError(
        f"{type(module).__name__}.{name} is no longer the parameter make_private wrapped: it was replaced (e.g. by "
        "load_state_dict(..., assign=True), or by assigning a new nn.Parameter), and the DP optimizer still holds the "
        "old one, so a step would not train the model. Load with assign=False (the default copies the values into "
        "the wrapped parameters), or call make_private again with the model's new parameters."
    )


def registrations(modules: List[nn.Module], params: List[nn.Parameter]) -> List[Tuple[nn.Module, str, nn.Parameter]]:
    """(module, name, p) for every entry of ``module._parameters`` (over ``modules``) holding one of ``params``."""
    wanted = {id(p) for p in params}
    return [(m, name, p) for m in modules for name, p in m._parameters.items() if p is not None and id(p) in wanted]
