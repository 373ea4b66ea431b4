"""``PrivacyArguments``: what `DPTrainer` (`flashnorm.integrations.transformers`) needs beyond Hugging Face's
``TrainingArguments`` (also importable from `flashnorm.integrations.transformers`)."""

from __future__ import annotations

import math
import warnings
import functools
from dataclasses import dataclass, field
from typing import Optional

from ..modes import get_mode

#: The values of ``PrivacyArguments.fused_head``.
FUSED_HEAD_SETTINGS = ("auto", "on", "off")
#: ``fused_head="auto"``: the fewest label positions (B·T) of a micro-batch that takes the fused head, on CUDA: the
#: long-context regime where the DP step on it was measured on an H100 (B = 1, T = 16k to 64k, the Llama-3.2-1B shape
#: and GPT-2 small) at 0.91-1.04x plain Hugging Face non-private training's time and a quarter to an eighth of its
#: memory (docs/huggingface.md); shorter micro-batches were not measured and keep the model's own logits.
AUTO_MIN_FUSED_TOKENS = 16384


@dataclass
class PrivacyArguments:
    """What `DPTrainer` needs beyond ``TrainingArguments``; parsable together with it by ``HfArgumentParser``
    (command line, JSON or YAML file), no field name clashing with ``TrainingArguments``'.

    Example:
        >>> parser = HfArgumentParser((TrainingArguments, PrivacyArguments))
        >>> training_args, privacy_args = parser.parse_args_into_dataclasses()
        >>> # python train.py --output_dir out --target_epsilon 8 --per_sample_max_grad_norm 1.0 --max_epsilon 8
        >>> training_args, privacy_args = parser.parse_json_file("args.json")

    Args:
        noise_multiplier: σ; give it or ``target_epsilon``, not both.
        target_epsilon: ε to reach at the end of training (σ from Opacus's ``get_noise_multiplier``
            for the run's number of DP steps and sample rate).
        target_delta: δ of the guarantee, of the logged ε and of the budget.
        per_sample_max_grad_norm: the per-sample clipping bound C, over all trainable parameters.
            (``TrainingArguments.max_grad_norm``, a clip of the batch gradient, is not applied: DP clips per
            sample. ``PrivacyArguments(max_grad_norm=...)``, this field's former name, still works with a
            ``FutureWarning``.)
        max_epsilon: the privacy budget: training stops before any DP step that would take ε (at
            ``target_delta``) past it, saving a checkpoint and logging why. Default: ``target_epsilon`` when that
            is given (so a second ``train()`` or a longer run cannot silently spend more), else no budget;
            ``inf`` switches the budget off.
        grad_sample_mode: a FlashNorm clipping mode: ``flash_fuse`` (default), ``flash`` or ``ghost``.
        accountant: Opacus's accountant: ``prv`` (default, as ``opacus.PrivacyEngine``), ``rdp`` or ``gdp``.
        poisson_sampling: Poisson-sample each logical batch (default; what the accountant assumes).
        log_loss: whether the Trainer logs the training loss (``loss`` at each logging step, ``train_loss`` at the
            end; default True). That loss is the mean per-sample loss of the logical batches *before* clipping and
            noise, computed from the training data: it is **not** differentially private and not covered by the ε
            the trainer reports. ``False`` computes no training loss: ``loss`` and ``train_loss`` are left out of
            the logs (ε, the learning rate and the evaluation metrics are still logged) and ``train()`` returns
            ``training_loss = nan``.
        fused_head: where a causal LM's loss is computed on FlashNorm's fused linear cross-entropy head
            (`flashnorm.integrations.fused_head`: the base model's hidden states, then the loss and its exact
            per-sample norms without the [B, T, V] logits) instead of from the model's own logits; both give the same
            loss and the same clipped gradient. ``"auto"`` (default): on CUDA, for micro-batches of at least
            ``AUTO_MIN_FUSED_TOKENS`` = 16384 label positions (B·T), the long-context regime where it was measured; the
            model's own logits otherwise, and on CPU (where the fused head runs a chunked PyTorch reference), for a
            model that cannot take it, and when `DPTrainer.dp_loss` is overridden. ``"on"``: every micro-batch
            fused, on any device; a model that cannot take it (a sequence classifier, logits that are not
            ``lm_head(h)``, PEFT prefix tuning) is refused at ``train()``, naming why. Under DDP each rank runs
            it on its own share. ``"off"``: never.
    """

    noise_multiplier: Optional[float] = field(
        default=None, metadata={"help": "The noise multiplier σ (give it or target_epsilon)."})
    target_epsilon: Optional[float] = field(
        default=None, metadata={"help": "ε to reach at the end of training; σ is computed from it."})
    target_delta: float = field(default=1e-5, metadata={"help": "δ of the (ε, δ) guarantee."})
    per_sample_max_grad_norm: float = field(
        default=1.0, metadata={"help": "The per-sample clipping bound C (TrainingArguments' max_grad_norm is not "
                                       "applied under DP)."})
    max_epsilon: Optional[float] = field(
        default=None, metadata={"help": "Stop training before a DP step would take ε past this budget (default: "
                                        "target_epsilon when given; inf: no budget)."})
    grad_sample_mode: str = field(
        default="flash_fuse", metadata={"help": "FlashNorm clipping mode: flash_fuse, flash or ghost."})
    accountant: str = field(default="prv", metadata={"help": "Opacus accountant: prv, rdp or gdp."})
    poisson_sampling: bool = field(default=True, metadata={"help": "Poisson-sample each logical batch."})
    log_loss: bool = field(
        default=True, metadata={"help": "Log the training loss (not private: computed before clipping and noise)."})
    fused_head: str = field(
        default="auto", metadata={"help": "A causal LM's loss on FlashNorm's fused linear cross-entropy head (no "
                                          "[B, T, V] logits; the same loss and clipped gradient): auto (on CUDA, for "
                                          f"micro-batches of at least {AUTO_MIN_FUSED_TOKENS} label positions), on "
                                          "(always; an unsupported model is refused) or off."})

    def __post_init__(self):
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"Give exactly one of noise_multiplier ({self.noise_multiplier}) and target_epsilon "
                f"({self.target_epsilon})."
            )
        if not self.per_sample_max_grad_norm > 0 or not math.isfinite(self.per_sample_max_grad_norm):
            raise ValueError(
                f"per_sample_max_grad_norm={self.per_sample_max_grad_norm}: the per-sample clipping bound C must be a "
                "finite number > 0."
            )
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise ValueError(f"max_epsilon={self.max_epsilon}: the privacy budget must be > 0 (inf: no budget).")
        if (self.max_epsilon is not None and self.target_epsilon is not None
                and self.max_epsilon < self.target_epsilon):
            raise ValueError(
                f"max_epsilon={self.max_epsilon} < target_epsilon={self.target_epsilon}: the run planned for "
                "target_epsilon would stop early; lower target_epsilon or raise max_epsilon."
            )
        if self.fused_head not in FUSED_HEAD_SETTINGS:
            raise ValueError(
                f"fused_head={self.fused_head!r} is not one of {', '.join(map(repr, FUSED_HEAD_SETTINGS))}: 'auto' "
                "(the fused head for long micro-batches on CUDA), 'on' (always) or 'off' (never)."
            )
        mode = get_mode(self.grad_sample_mode)  # raises on an unknown mode, listing the valid ones
        if mode.delegated or mode.fsdp:
            raise ValueError(
                f"grad_sample_mode={self.grad_sample_mode!r}: DPTrainer trains with FlashNorm's clipping modes "
                "for one process or DDP: 'flash_fuse', 'flash' or 'ghost'."
            )

    @property
    def budget(self) -> float:
        """The ε budget in force: ``max_epsilon``, else ``target_epsilon``, else ``inf`` (none)."""
        if self.max_epsilon is not None:
            return float(self.max_epsilon)
        if self.target_epsilon is not None:
            return float(self.target_epsilon)
        return math.inf


# The former name of per_sample_max_grad_norm, ``max_grad_norm``, is accepted by the constructor and read as a
# property, both with a FutureWarning. It is not a dataclass field, so HfArgumentParser (which would clash with
# TrainingArguments.max_grad_norm), ``dataclasses.fields``, ``asdict`` and ``replace`` do not see it.
_dataclass_init = PrivacyArguments.__init__


@functools.wraps(_dataclass_init)
def _init(self, *args, max_grad_norm: Optional[float] = None, **kwargs):
    if max_grad_norm is not None:
        given = kwargs.get("per_sample_max_grad_norm")
        if given is not None and given != max_grad_norm:
            raise ValueError(
                f"PrivacyArguments got max_grad_norm={max_grad_norm} and per_sample_max_grad_norm={given}: "
                "max_grad_norm is the former name of per_sample_max_grad_norm; give only per_sample_max_grad_norm."
            )
        warnings.warn(
            "PrivacyArguments(max_grad_norm=...) is renamed per_sample_max_grad_norm (the old name clashed with "
            "TrainingArguments.max_grad_norm in HfArgumentParser): pass per_sample_max_grad_norm.",
            FutureWarning, stacklevel=2,
        )
        kwargs["per_sample_max_grad_norm"] = float(max_grad_norm)
    _dataclass_init(self, *args, **kwargs)


def _max_grad_norm(self: PrivacyArguments) -> float:
    warnings.warn("PrivacyArguments.max_grad_norm is renamed per_sample_max_grad_norm.", FutureWarning, stacklevel=2)
    return self.per_sample_max_grad_norm


PrivacyArguments.__init__ = _init
PrivacyArguments.max_grad_norm = property(_max_grad_norm, doc="Former name of per_sample_max_grad_norm (read-only).")
