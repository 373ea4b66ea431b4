"""Two backward passes: the norm pass, then Σ_b c_b ℓ_b back-propagated as usual (``ghost``, ``flash``)."""

from __future__ import annotations

import torch

from .workflow import FlashNormGradSampleModule


class GradSampleModuleFastGradientClipping(FlashNormGradSampleModule):
    """Pass 1 computes norms without any parameter gradient; pass 2 back-propagates Σ_b c_b ℓ_b.

    ``use_flash_clipping=True`` gives flash norms (mode ``flash``); ``False`` with
    ``use_ghost_clipping=True`` gives Gram norms (mode ``ghost``).
    """

    passes = 2

    def _write_clipped_gradients(self, loss_per_sample, coef):
        weighted = (coef.detach().to(loss_per_sample.dtype) * loss_per_sample).sum()
        torch.autograd.backward(weighted)
