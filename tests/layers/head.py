"""The fused head's test models and their float64 oracle: the same model with the unfused head (logits = X Wᵀ + b,
then cross-entropy per token), differentiated per sample by ordinary autograd (`tests.oracle`)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from flashnorm.layers import FusedLinearCrossEntropy, PerSampleLoss
from tests.oracle import OracleStep, microbatch_reference

IGNORE = -100


class TinyLM(nn.Module):
    """ids [B, T] → Embedding(V, d) → Linear(d, d) → tanh → the head (a registered ``lm_head`` Linear, tied to the
    embedding or not, as in Hugging Face models, whose Parameters the fused head shares)."""

    def __init__(self, vocab: int, d: int, *, tied: bool, bias: bool = False, **head_options):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=bias)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.head = FusedLinearCrossEntropy.from_linear(self.lm_head, **head_options)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.embed(ids)))

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ids), labels)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The unfused head: what the oracle differentiates."""
        return self.lm_head(self.hidden(ids))


def per_sample_cross_entropy(logits, labels, *, shift=False, token_reduction="mean", label_smoothing=0.0,
                             ignore_index=IGNORE) -> torch.Tensor:
    """ℓ [B] from full logits [B, T, V]: ``nn.functional.cross_entropy`` per token, summed per sample or averaged
    over its valid tokens (Opacus's per-sequence loss)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    vocab = logits.shape[-1]
    tokens = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=ignore_index,
                             reduction="none", label_smoothing=label_smoothing).view(labels.shape)
    if token_reduction == "sum":
        return tokens.sum(dim=1)
    return tokens.sum(dim=1) / (labels != ignore_index).sum(dim=1).clamp(min=1)


def head_options_of(model: TinyLM) -> dict:
    head = model.head
    return dict(shift=head.shift, token_reduction=head.token_reduction, label_smoothing=head.label_smoothing,
                ignore_index=head.ignore_index)


def oracle(model: TinyLM, ids, labels, clip: float) -> OracleStep:
    """The float64 microbatch loop on the unfused head."""
    options = head_options_of(model)
    return microbatch_reference(
        model, ids, labels, lambda logits, y: per_sample_cross_entropy(logits, y, **options).sum(), clip,
        forward=lambda m, x: m.logits(x),
    )


def oracle_per_sample(model: TinyLM, ids, labels) -> dict:
    """{name: [B, *θ.shape]}: each sample's float64 gradient through the unfused head (ordinary autograd, one
    sample at a time), for steps whose coefficients are checked apart from the gradients."""
    options = head_options_of(model)
    ref = copy.deepcopy(model).double()
    params = {name: p for name, p in ref.named_parameters() if p.requires_grad}
    grads = {name: [] for name in params}
    for b in range(ids.shape[0]):
        for p in params.values():
            p.grad = None
        per_sample_cross_entropy(ref.logits(ids[b:b + 1]), labels[b:b + 1], **options).sum().backward()
        for name, p in params.items():
            grads[name].append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    return {name: torch.stack(g) for name, g in grads.items()}


def batch(vocab: int, batch_size: int, steps: int, seed: int = 0, ignored: bool = True):
    """(ids, labels) [B, T]: labels are the ids (a causal LM's), with sample 1's first half ignored and, for B ≥ 3,
    every position of sample 2 ignored."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, steps), generator=gen)
    labels = ids.clone()
    if ignored and batch_size > 1:
        labels[1, : max(1, steps // 2)] = IGNORE
    if ignored and batch_size > 2:
        labels[2] = IGNORE
    return ids, labels


def make_private(model, mode, ids, labels, clip, reduction, **kwargs):
    """FlashNorm's make_private with SGD(lr=1), noise 0 and a loader of the one batch."""
    return FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=PerSampleLoss(reduction),
        data_loader=DataLoader(TensorDataset(ids, labels), batch_size=ids.shape[0]), noise_multiplier=0.0,
        max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode, loss_reduction=reduction, **kwargs,
    )


def dp_step(model, mode, ids, labels, clip, reduction, **kwargs):
    """One DP step; returns (wrapped model, {name: applied gradient}) (the optimizer's p.grad after step())."""
    dp_model, optimizer, criterion, _ = make_private(model, mode, ids, labels, clip, reduction, **kwargs)
    criterion(dp_model(ids, labels)).backward()
    optimizer.step()
    return dp_model, {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
