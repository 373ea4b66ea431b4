"""``PrivacyArguments``: what :class:`~flashnorm.integrations.transformers.DPTrainer` needs beyond Hugging Face's
``TrainingArguments`` (also importable from :mod:`flashnorm.integrations.transformers`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..modes import get_mode


@dataclass
class PrivacyArguments:
    """What :class:`DPTrainer` needs beyond ``TrainingArguments`` (parsable by ``HfArgumentParser``).

    Args:
        noise_multiplier: σ; give it or ``target_epsilon``, not both.
        target_epsilon: ε to reach at the end of training (σ from Opacus's ``get_noise_multiplier``
            for the run's number of DP steps and sample rate).
        target_delta: δ of the guarantee and of the logged ε.
        max_grad_norm: the per-sample clipping bound C. (``TrainingArguments.max_grad_norm``, a clip
            of the batch gradient, is not applied: DP clips per sample.)
        grad_sample_mode: a FlashNorm clipping mode: ``flash_fuse`` (default), ``flash`` or ``ghost``.
        accountant: Opacus's accountant: ``prv`` (default, as ``opacus.PrivacyEngine``), ``rdp`` or ``gdp``.
        poisson_sampling: Poisson-sample each logical batch (default; what the accountant assumes).
        log_loss: whether the Trainer logs the training loss (``loss`` at each logging step, ``train_loss`` at the
            end; default True). That loss is the mean per-sample loss of the logical batches *before* clipping and
            noise, computed from the training data: it is **not** differentially private and not covered by the ε
            the trainer reports. ``False`` computes no training loss: ``loss`` and ``train_loss`` are left out of
            the logs (ε, the learning rate and the evaluation metrics are still logged) and ``train()`` returns
            ``training_loss = nan``.
    """

    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "flash_fuse"
    accountant: str = "prv"
    poisson_sampling: bool = True
    log_loss: bool = True

    def __post_init__(self):
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"Give exactly one of noise_multiplier ({self.noise_multiplier}) and target_epsilon "
                f"({self.target_epsilon})."
            )
        mode = get_mode(self.grad_sample_mode)  # raises on an unknown mode, listing the valid ones
        if mode.delegated or mode.fsdp:
            raise ValueError(
                f"grad_sample_mode={self.grad_sample_mode!r}: DPTrainer trains with FlashNorm's clipping modes "
                "for one process or DDP: 'flash_fuse', 'flash' or 'ghost'."
            )
