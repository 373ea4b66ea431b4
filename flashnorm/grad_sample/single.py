"""The grad-sample module classes of one process (and of Opacus's ``DPDDP``, which reduces nothing in the backward
pass): the base module with the writer of the ``ghost``/``flash`` rows, or of the ``flash_fuse`` row."""

from __future__ import annotations

from .module import FlashNormGradSampleModule
from .writers import AssembleFromKept, SecondBackward


class GradSampleModuleFastGradientClipping(FlashNormGradSampleModule):
    """Two backward passes (``ghost``, ``flash``): the norm pass computes no parameter gradient, the second pass
    back-propagates Σ_b c_b ℓ_b (`SecondBackward`).

    ``use_flash_clipping=True`` gives flash norms (mode ``flash``); ``False`` with ``use_ghost_clipping=True`` gives
    Gram norms (mode ``ghost``).
    """

    writer_class = SecondBackward


class GradSampleModuleFastGradientClippingFuse(FlashNormGradSampleModule):
    """One backward pass with bookkeeping (``flash_fuse``): the layers compute input gradients and norms, no weight
    gradients; the clipped gradients are assembled after the pass
    (`AssembleFromKept`)."""

    writer_class = AssembleFromKept
