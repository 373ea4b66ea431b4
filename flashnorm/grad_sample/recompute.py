"""Activation checkpointing recomputes a region in every backward: a second backward must recompute what the norm pass
measured. A checkpoint that does not restore the random-number state (``preserve_rng_state=False``) around dropout
draws new masks at each recompute, and the second pass would apply a gradient whose norm nobody measured.

So a two-pass step whose forward ran checkpointed layers watches the random-number state across its norm pass: a
checkpoint that preserves it forks and restores it around its recompute, so the state changes only when a recompute
drew random numbers of its own, which the second backward would draw differently."""

from __future__ import annotations

from typing import List, Optional

import torch


class RandomStateWatch:
    """The random-number states of the CPU and of ``device`` (when CUDA) when made; `changed` compares."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.states: List[torch.Tensor] = self._read()

    def _read(self) -> List[torch.Tensor]:
        states = [torch.get_rng_state()]
        if self.device is not None:
            states.append(torch.cuda.get_rng_state(self.device))
        return states

    def changed(self) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(self.states, self._read()))


def refuse_unrepeatable_recompute(watch: Optional[RandomStateWatch]) -> None:
    """Raises when the norm pass's recomputes drew random numbers (see the module docstring).

    Raises:
        RuntimeError: naming the cause and the fix, before anything is written.
    """
    if watch is not None and watch.changed():
        raise RuntimeError(
            "Activation checkpointing drew random numbers while the norm pass recomputed it (a checkpoint with "
            "preserve_rng_state=False around dropout or another random op): the second backward would recompute "
            "other values than the norm pass measured. Keep preserve_rng_state=True (the default), or use "
            "grad_sample_mode='flash_fuse', which recomputes once."
        )
