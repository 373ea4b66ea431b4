"""What ``make_private`` returns: tuples that explain themselves when unpacked into the wrong number of names.

FlashNorm's clipping modes return four objects, ``(module, optimizer, criterion, data_loader)``, as Opacus's
``ghost`` mode does; Opacus's other modes (``hooks``, ...) return three, ``(module, optimizer, data_loader)``.
Code written for one kind and run with the other fails with Python's "too many values to unpack (expected 3)".

`MadePrivate` and `MadePrivateOpacus` are named tuples (fields by name too: ``result.criterion``). When
``a, b, c = result`` (CPython's ``UNPACK_SEQUENCE``) asks for another count, the instruction being executed by the
caller tells ``__iter__`` the count, and it raises the same ``ValueError`` that Python would have raised, with a
message that names the four (or three) values. Iteration of any other kind (``list(result)``,
``for x in result``, star unpacking) is a plain tuple's.
"""

from __future__ import annotations

import dis
import sys
from types import FrameType
from typing import TYPE_CHECKING, Iterator, NamedTuple, Optional

from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from .criterion import DPLossFastGradientClipping
    from .grad_sample import FlashNormGradSampleModule
    from .optimizers import DPOptimizerFastGradientClipping


def unpacking_count(frame: Optional[FrameType]) -> Optional[int]:
    """The number of names ``frame`` is unpacking a value into (``a, b, c = value``: 3), when the instruction it
    executes is ``UNPACK_SEQUENCE``; else ``None`` (any other use, or an interpreter without frames)."""
    if frame is None:
        return None
    for instruction in dis.get_instructions(frame.f_code):
        if instruction.offset == frame.f_lasti:
            return instruction.arg if instruction.opname == "UNPACK_SEQUENCE" else None
    return None


def _caller() -> Optional[FrameType]:
    """The frame that asked ``__iter__`` for an iterator (two levels up from here)."""
    try:
        return sys._getframe(2)
    except (AttributeError, ValueError):
        return None


def _checked_iter(result: tuple, caller: Optional[FrameType], how: str) -> Iterator:
    """``result``'s iterator, or ``ValueError`` when ``caller`` unpacks it into another number of names than it has
    (``how``: the right unpacking and why)."""
    count = unpacking_count(caller)
    if count is not None and count != len(result):
        raise ValueError(f"make_private returned {len(result)} values, not {count}: {how}")
    return tuple.__iter__(result)


class MadePrivate(NamedTuple):
    """``make_private``'s result in FlashNorm's clipping modes: ``module, optimizer, criterion, data_loader``.

    Unpacked into another number of names it raises ``ValueError`` naming the four.
    """

    module: FlashNormGradSampleModule
    optimizer: DPOptimizerFastGradientClipping
    criterion: DPLossFastGradientClipping
    data_loader: DataLoader

    def __iter__(self) -> Iterator:
        return _checked_iter(self, _caller(), (
            "model, optimizer, criterion, data_loader = engine.make_private(...). In the clipping modes (ghost, flash, "
            "flash_fuse and their _fsdp variants, as in Opacus's ghost mode) it also returns the DP criterion: compute "
            "the loss with it, loss = criterion(model(x), y), so that loss.backward() clips each sample's gradient."
        ))


class MadePrivateOpacus(NamedTuple):
    """``make_private``'s result in Opacus's per-sample-gradient modes (``hooks``, ``functorch``, ``ew``,
    ``no_op``): ``module, optimizer, data_loader``.

    Unpacked into another number of names it raises ``ValueError`` naming the three.
    """

    module: GradSampleModule
    optimizer: DPOptimizer
    data_loader: DataLoader

    def __iter__(self) -> Iterator:
        return _checked_iter(self, _caller(), (
            "model, optimizer, data_loader = engine.make_private(...). Opacus's per-sample-gradient modes (hooks, "
            "functorch, ew, no_op) return no criterion: use your own loss. FlashNorm's clipping modes "
            "(grad_sample_mode='flash_fuse', 'flash', 'ghost') return four values, with the DP criterion third."
        ))
