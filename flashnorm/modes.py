"""The one table of ``grad_sample_mode`` strings (DESIGN §2). Everything else asks it.

=========================  ======  ====================  ==========================================
mode                       passes  norm algorithm        notes
=========================  ======  ====================  ==========================================
hooks, functorch, ew,      1       per-sample gradients  delegated to Opacus unchanged
no_op
ghost                      2       Gram (ghost)          Opacus-equivalent baseline
flash                      2       flash, planned        pass 1 computes no parameter gradients
flash_fuse (flash_bk)      1       flash + bookkeeping   layers compute no weight gradient in the
                                                         pass; clipped gradients assembled after it
ghost_fsdp, flash_fsdp,    as      as above              module wrapped with FSDP2 (``fully_shard``,
flash_fuse_fsdp            above                         e.g. via ``flashnorm.utils.fsdp_utils.FSDP2Wrapper``)
=========================  ======  ====================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class Mode:
    """One row of the mode table.

    Attributes:
        name: the ``grad_sample_mode`` string.
        delegated: ``True`` when Opacus handles the mode unchanged.
        passes: backward passes per step (1 or 2) for FlashNorm's own modes.
        norm_method: ``"gram"``, ``"flash"`` (planned per layer) for FlashNorm's modes.
        fsdp: the module is wrapped with FSDP2.
    """

    name: str
    delegated: bool
    passes: Optional[int] = None
    norm_method: Optional[str] = None
    fsdp: bool = False

    @property
    def fused(self) -> bool:
        """One backward pass with bookkeeping (the layers compute no weight gradient)."""
        return self.passes == 1 and not self.delegated


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


for _name in ("hooks", "functorch", "ew", "no_op"):
    register_mode(Mode(_name, delegated=True))
register_mode(Mode("ghost", False, passes=2, norm_method="gram"))
register_mode(Mode("flash", False, passes=2, norm_method="flash"))
register_mode(Mode("flash_fuse", False, passes=1, norm_method="flash"), aliases=("flash_bk",))
register_mode(Mode("ghost_fsdp", False, passes=2, norm_method="gram", fsdp=True))
register_mode(Mode("flash_fsdp", False, passes=2, norm_method="flash", fsdp=True))
register_mode(Mode("flash_fuse_fsdp", False, passes=1, norm_method="flash", fsdp=True))
