"""The one table of ``grad_sample_mode`` strings. Everything else asks it.

| mode | norm algorithm | writer | notes |
|---|---|---|---|
| `hooks`, `functorch`, `ew`, `no_op` | per-sample gradients | (Opacus) | delegated to Opacus unchanged |
| `ghost` | Gram (ghost) | `SecondBackward` | Opacus-equivalent baseline, two passes |
| `flash` | flash, planned | `SecondBackward` | pass 1 computes no parameter gradients |
| `flash_fuse` (`flash_bk`) | flash, planned | `AssembleFromKept` | one pass: layers compute no weight gradient; clipped gradients assembled after it |
| `ghost_fsdp`, `flash_fsdp` | as above | `SecondBackward` | module wrapped with FSDP2 (`fully_shard`, e.g. `flashnorm.utils.fsdp_utils.FSDP2Wrapper`) |
| `flash_fuse_fsdp` | flash, planned | `ReduceScatterAssembly` | as above |

The writer (`flashnorm.grad_sample.writers`) says how the clipped gradients are written once the coefficients
are known; a new clipping mode is a row here plus, if it needs one, a writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional, get_args

from .grad_sample.fsdp import ReduceScatterAssembly
from .grad_sample.writers import AssembleFromKept, SecondBackward


@dataclass(frozen=True)
class Mode:
    """One row of the mode table.

    Attributes:
        name: the ``grad_sample_mode`` string.
        delegated: ``True`` when Opacus handles the mode unchanged.
        norm_algorithm: ``"gram"``, ``"flash"`` (planned per layer) for FlashNorm's modes.
        writer: the `ClippedGradientWriter` class of FlashNorm's modes.
        fsdp: the module is wrapped with FSDP2.
    """

    name: str
    delegated: bool
    norm_algorithm: Optional[str] = None
    writer: Optional[type] = None
    fsdp: bool = False

    @property
    def passes(self) -> Optional[int]:
        """Backward passes per step (the writer's), ``None`` for Opacus's modes."""
        return None if self.writer is None else self.writer.backward_passes


#: The table's clipping modes and aliases, for type checkers: ``make_private`` returns four values for these
#: (`flashnorm.made_private.MadePrivate`). A test keeps both literals equal to the table below.
ClippingModeName = Literal["ghost", "flash", "flash_fuse", "flash_bk", "ghost_fsdp", "flash_fsdp", "flash_fuse_fsdp"]
#: The modes delegated to Opacus: ``make_private`` returns three values (`flashnorm.made_private.MadePrivateOpacus`).
DelegatedModeName = Literal["hooks", "functorch", "ew", "no_op"]

_MODES: Dict[str, Mode] = {}
_ALIASES: Dict[str, str] = {}


def register_mode(mode: Mode, *, aliases=(), force: bool = False) -> Mode:
    """Adds ``mode`` to the table; refuses to overwrite a name unless ``force``."""
    for name in (mode.name, *aliases):
        if not force and (name in _MODES or name in _ALIASES):
            raise ValueError(f"grad_sample_mode {name!r} is already registered")
    _MODES[mode.name] = mode
    for alias in aliases:
        _ALIASES[alias] = mode.name
    return mode


def valid_mode_names() -> list:
    """Every accepted string, aliases included, in table order."""
    return list(_MODES) + list(_ALIASES)


def get_mode(name: str) -> Mode:
    """Looks ``name`` up (aliases resolved).

    Raises:
        ValueError: unknown name; the message lists every valid mode.
    """
    mode = _MODES.get(_ALIASES.get(name, name)) if isinstance(name, str) else None
    if mode is None:
        raise ValueError(
            f"Unknown grad_sample_mode {name!r}. Valid modes: {', '.join(valid_mode_names())}."
        )
    return mode


for _name in get_args(DelegatedModeName):
    register_mode(Mode(_name, delegated=True))
register_mode(Mode("ghost", False, norm_algorithm="gram", writer=SecondBackward))
register_mode(Mode("flash", False, norm_algorithm="flash", writer=SecondBackward))
register_mode(Mode("flash_fuse", False, norm_algorithm="flash", writer=AssembleFromKept), aliases=("flash_bk",))
register_mode(Mode("ghost_fsdp", False, norm_algorithm="gram", writer=SecondBackward, fsdp=True))
register_mode(Mode("flash_fsdp", False, norm_algorithm="flash", writer=SecondBackward, fsdp=True))
register_mode(Mode("flash_fuse_fsdp", False, norm_algorithm="flash", writer=ReduceScatterAssembly, fsdp=True))
