"""The two numbers a DP step's guarantee rests on, the noise multiplier σ and the bound C: one owner, one check."""

from __future__ import annotations

import math
import weakref
import zlib
from typing import Callable, Dict, Optional, Tuple, Union


class PrivacyParameters:
    """σ and C of a DP training run, shared by reference by the DP optimizer (its owner) and the grad-sample module.

    The optimizer's ``noise_multiplier`` and ``max_grad_norm`` read and write these attributes (Opacus's noise and
    clipping schedulers change them between steps), and the grad-sample module reads C from here when it clips, so
    the coefficient and the noise use the same C. Values are checked where they are used (`check`), so a
    scheduler that sets an invalid one makes the next step fail before any parameter changes.

    σ and C are fixed from the first clipped backward pass of a logical step until the ``optimizer.step()`` that
    applies it (`pin`, `check_for_step`, `release`): a change in between (between a backward and
    its step, between the micro-batches of gradient accumulation, across skipped or virtual steps) raises
    ``RuntimeError`` at the next backward or step, before anything changes, instead of noising a sum clipped with
    another C. Changes between logical steps (after the step, as Opacus's schedulers make them) take effect at the
    next clipped backward. The pin is held only once an optimizer `attach_step`-ed itself; a pin whose
    gradients were discarded (``zero_grad``, ``p.grad = None``) is stale and gives way to the current values.

    Args:
        noise_multiplier: σ (a finite number ≥ 0).
        max_grad_norm: C (a finite number > 0).

    Raises:
        ValueError: an invalid σ or C (see `check`).
    """

    def __init__(self, noise_multiplier: float, max_grad_norm: float):
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.check()
        #: (σ, C) that the clipped gradients waiting for the next step were computed with; None when none wait.
        self.pinned: Optional[Tuple[float, float]] = None
        self._waiting: Optional[Callable[[], Optional[Callable[[], bool]]]] = None  # weak ref to the step's probe

    def check(self) -> None:
        """Raises ``ValueError`` unless σ is a finite number ≥ 0 and C a finite number > 0.

        C = inf disables clipping and a negative or NaN σ adds no noise: either voids the guarantee silently.
        """
        sigma, clip = self.noise_multiplier, self.max_grad_norm
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_multiplier={sigma!r}: it must be a finite number >= 0.")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 0):
            raise ValueError(
                f"max_grad_norm={clip!r}: FlashNorm's clipping modes need one finite number > 0 (flat "
                "clipping); per-layer bounds need grad_sample_mode='hooks'."
            )

    def clip_bound(self) -> float:
        """C, checked (with σ) as it is about to be used."""
        self.check()
        return float(self.max_grad_norm)

    def attach_step(self, gradients_waiting: Callable[[], bool]) -> None:
        """Called by the DP optimizer that steps with these parameters: ``gradients_waiting()`` says whether clipped
        gradients wait for its next step (held by weak reference). From then on `pin` fixes σ and C."""
        self._waiting = weakref.WeakMethod(gradients_waiting) if hasattr(gradients_waiting, "__self__") else (
            lambda: gradients_waiting)
        self.pinned = None

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy`` of a wrapped model, pickling) holds σ and C, not the pin or its optimizer."""
        return {**self.__dict__, "_waiting": None, "pinned": None}

    def _gradients_waiting(self) -> bool:
        probe = self._waiting() if self._waiting is not None else None
        return bool(probe is not None and probe())

    def pin(self) -> float:
        """C for a clipped backward pass, checked; the first clipped backward of a logical step pins (σ, C).

        Raises:
            ValueError: an invalid σ or C (`check`).
            RuntimeError: σ or C differs from the values the gradients already accumulated for this step were
                clipped with (before the backward changes anything).
        """
        self.check()
        current = (self.noise_multiplier, self.max_grad_norm)
        if self._waiting is not None and self.pinned != current:
            if self.pinned is not None and self._gradients_waiting():
                raise self._changed("this clipped backward pass")
            self.pinned = current
        return float(self.max_grad_norm)

    def check_for_step(self) -> None:
        """Before ``optimizer.step()`` changes anything: `check`, and σ and C must be the pinned ones.

        Raises:
            ValueError: an invalid σ or C.
            RuntimeError: σ or C changed since the first clipped backward of the step's gradients.
        """
        self.check()
        if self.pinned is not None and self.pinned != (self.noise_multiplier, self.max_grad_norm):
            if self._gradients_waiting():
                raise self._changed("optimizer.step()")
            self.pinned = None  # stale: the gradients it was for were discarded

    def release(self) -> None:
        """The step applied the pinned values (or the gradients were discarded): σ and C may change again."""
        self.pinned = None

    def _changed(self, where: str) -> RuntimeError:
        (sigma, clip), now = self.pinned, (self.noise_multiplier, self.max_grad_norm)
        changed = " and ".join(
            f"{name} from {old!r} to {new!r}"
            for name, old, new in (("max_grad_norm", clip, now[1]), ("noise_multiplier", sigma, now[0]))
            if old != new
        )
        return RuntimeError(
            f"{where} refused: {changed} since the first clipped backward pass of this logical step. The gradients "
            f"accumulated for it were clipped with C = {clip!r} and the step's noise must be sized for that C "
            f"(σ = {sigma!r}); mixing them would let a sample count more than the noise covers. Change σ and C only "
            "between logical steps (after the optimizer.step() that applies them, as Opacus's schedulers do), or "
            "set them back; no parameter has changed."
        )

    def __repr__(self) -> str:
        return f"PrivacyParameters(noise_multiplier={self.noise_multiplier!r}, max_grad_norm={self.max_grad_norm!r})"



def check_same_on_every_rank(values: Dict[str, Union[float, str]], device, hints: Optional[Dict[str, str]] = None
                             ) -> None:
    """Raises ``ValueError`` on every rank unless every rank passes the same ``values`` (numbers, or strings compared
    by a CRC-32 of their text): one MAX all-reduce of a small float64 tensor [v, -v].

    Args:
        values: name → this rank's value (e.g. ``max_grad_norm``, ``grad_sample_mode``).
        device: where the collective runs (the module's device; CPU for gloo).
        hints: name → the fix, appended to the message when that value differs.
    """
    import torch
    import torch.distributed as dist

    names = list(values)
    codes = [float(zlib.crc32(str(v).encode())) if isinstance(v, str) else float(v) for v in values.values()]
    local = torch.tensor(codes, dtype=torch.float64, device=device)
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: len(names)].tolist(), (-both[len(names):]).tolist()
    differing = []
    for name, value, lo, hi in zip(names, values.values(), low, high):
        if lo != hi:
            seen = f"this rank: {value!r}" if isinstance(value, str) else f"from {lo!r} to {hi!r}"
            differing.append(f"{name} differs across ranks ({seen})" + (f": {hints[name]}" if hints and name in hints else ""))
    if differing:
        raise ValueError(
            "; ".join(differing) + ". Every rank must train with the same privacy parameters and the same step, or "
            "the guarantee and the accountant's ε hold for none of them; no parameter has changed."
        )


def privacy_attribute(name: str, doc: str) -> property:
    """A property reading and writing attribute ``name`` of the owner's ``privacy`` (`PrivacyParameters`)."""

    def get(self):
        return getattr(self.privacy, name)

    def set_(self, value) -> None:
        setattr(self.privacy, name, value)

    return property(get, set_, doc=doc)
