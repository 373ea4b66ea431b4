"""Hugging Face causal LMs on the fused head: the base model's hidden states, then
`FusedLinearCrossEntropy` on ``lm_head``'s own Parameters (tied or not), so that no
[B, T, V] logit tensor exists and the model's forward returns the per-sample losses ℓ [B].

The one-line switch for a plain loop (Llama, Qwen2, Mistral, Gemma, GPT-2, and other causal LMs whose logits are
``lm_head(hidden_states)``)::

    model = fused_causal_lm(hf_model)                       # forward(input_ids=..., labels=..., **kwargs) → ℓ [B]
    model, optimizer, criterion, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, criterion=PerSampleLoss(), data_loader=loader, ...,
        grad_sample_mode="flash_fuse")
    criterion(model(**batch)).backward(); optimizer.step()

``labels`` keep transformers' semantics: aligned with ``input_ids`` and shifted inside (position t is scored on
labels[t + 1]), -100 ignored. ℓ_b is the mean over the sample's scored positions (``token_reduction="mean"``: what
DPTrainer trains and Opacus's ``loss_reduction="mean"`` with ``shape=(B, T, V)`` gives; 0 for a sample with none), or
their sum (``"sum"``, for ``loss_reduction="sum"``); ``label_smoothing`` is transformers' ``LabelSmoother``'s ε.
``min_fused_tokens`` keeps calls of fewer label positions on the model's own ``lm_head`` (the same ℓ, computed from
its logits). `flashnorm.integrations.transformers.DPTrainer` trains causal LMs this way as
``PrivacyArguments.fused_head`` says (``"auto"``: on CUDA, for micro-batches of at least 16384 label positions;
``"on"``; ``"off"``).
`fused_head_unsupported` says why a model cannot take the fused head (its logits are not ``lm_head(h)``: soft-capped or
scaled, as its config says, or a layer with parameters of its own, such as BERT's prediction transform, lies between
the base model and ``lm_head``); the HF model itself stays ``model.model`` (save it, not the wrapper).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..layers import FusedLinearCrossEntropy

IGNORE_INDEX = -100
#: Config attributes of models whose logits are not lm_head(h) (soft-capped, scaled): the fused head refuses them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                     "output_multiplier_scale")


def fused_head_unsupported(model: nn.Module) -> Optional[str]:
    """``None`` when ``model`` (a transformers causal LM) can run on the fused head, else why not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return f"its output embeddings are {type(head).__module__}.{type(head).__qualname__}, not torch.nn.Linear"
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return "it has no base model (model.base_model) to compute the hidden states"
    known = {id(p) for p in base.parameters()} | {id(p) for p in head.parameters()}
    outside = [name for name, p in model.named_parameters() if id(p) not in known]
    if outside:
        return (f"it has parameters outside its base model and lm_head ({outside[0]}): a layer between the hidden "
                "states and lm_head")
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"its logits are transformed after lm_head ({name}={value})"
    return None


class FusedHeadCausalLM(nn.Module):
    """A transformers causal LM whose forward returns the per-sample losses ℓ [B] through the fused head.

    Args:
        model: the causal LM (``...ForCausalLM``, ``GPT2LMHeadModel``); it stays ``self.model``, its Parameters the
            same objects (an optimizer built on it trains this module).
        token_reduction, label_smoothing, vocab_block, backend: those of
            `FusedLinearCrossEntropy`.
        min_fused_tokens: a call whose labels hold fewer positions (B·T) than this takes the unfused path: the
            logits from the model's own ``lm_head`` module, then the same per-sample loss
            (`FusedLinearCrossEntropy.logit_losses`), so that ℓ, and under ``make_private`` the clipped gradient
            (through ``lm_head``'s own norm rule), are those of the fused path. Default 0: always fused.

    Raises:
        ValueError: the model cannot take the fused head (`fused_head_unsupported`).
    """

    def __init__(self, model: nn.Module, *, token_reduction: str = "mean", label_smoothing: float = 0.0,
                 vocab_block: Optional[int] = None, backend: Optional[str] = None, min_fused_tokens: int = 0):
        super().__init__()
        reason = fused_head_unsupported(model)
        if reason is not None:
            raise ValueError(f"{type(model).__name__} cannot take the fused head: {reason}. Train it unfused.")
        if min_fused_tokens < 0:
            raise ValueError(f"min_fused_tokens={min_fused_tokens} must be ≥ 0")
        self.model = model
        self.min_fused_tokens = min_fused_tokens
        self.head = FusedLinearCrossEntropy.from_linear(
            model.get_output_embeddings(), ignore_index=IGNORE_INDEX, shift=True, token_reduction=token_reduction,
            label_smoothing=label_smoothing, vocab_block=vocab_block, backend=backend,
        )

    def forward(self, input_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        """ℓ [B] for ``labels`` [B, T] (required); every other argument goes to the base model (``use_cache``
        defaults to False). Fused unless the labels hold fewer than ``min_fused_tokens`` positions."""
        if labels is None:
            raise ValueError("FusedHeadCausalLM needs labels: its forward returns the per-sample losses.")
        kwargs.setdefault("use_cache", False)
        out = self.model.base_model(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if labels.numel() < self.min_fused_tokens:
            return self.head.logit_losses(self.model.get_output_embeddings()(hidden), labels)
        return self.head(hidden, labels)


def fused_causal_lm(model: nn.Module, **options) -> FusedHeadCausalLM:
    """``model`` on the fused head (see the module docstring): ``fused_causal_lm(model)(input_ids=..., labels=...)``
    → ℓ [B]. ``options``: those of `FusedHeadCausalLM`."""
    return FusedHeadCausalLM(model, **options)
