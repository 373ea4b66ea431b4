"""A grad-sample module used directly (no privacy engine), on float64 models, against the float64 oracle.

``wrap(cls, model)`` gives (module, DP optimizer, DP criterion) at C = 0.1; ``oracle_of`` runs the microbatch loop
with per-sample cross-entropy; ``assert_norms`` and ``assert_clipped_sum`` compare at the fp64 tolerance. ``Graph``
builds a small model from named layers and a forward function (a layer called twice, weights tied, an output that
never reaches the loss); ``TwoHeads`` is a LayerNorm'd trunk with two heads, of which the loss may use one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from flashnorm.optimizers import DPOptimizerFastGradientClipping
from flashnorm.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from tests.conftest import TOLERANCES
from tests.grad_sample.guarantee import cross_entropy_sum, reference
from tests.oracle import OracleStep

#: The clipping bound of these tests: small enough that every sample is clipped.
CLIP = 0.1
RTOL, ATOL = TOLERANCES["fp64"]


def wrap(cls, model, **kwargs):
    """(``cls(model)`` at C = 0.1, its DP optimizer (SGD, σ = 0, expected batch size 3), the DP criterion)."""
    gsm = cls(model, max_grad_norm=CLIP, **kwargs)
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                          max_grad_norm=CLIP, expected_batch_size=3)
    return gsm, opt, DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(reduction="mean"))


def per_sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ: [B], the per-sample cross-entropy that ``clipped_backward`` takes."""
    return nn.functional.cross_entropy(out, target, reduction="none")


def oracle_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float = CLIP, **kwargs) -> OracleStep:
    """The float64 microbatch loop of ``model`` as it is now, wrapped or not (a copy without hooks), under per-sample
    cross-entropy (``kwargs``: those of `microbatch_reference`)."""
    return reference(model, x, y, clip, cross_entropy_sum, **kwargs)


def assert_norms(norms: torch.Tensor, oracle: OracleStep) -> None:
    torch.testing.assert_close(norms, oracle.norms, rtol=RTOL, atol=ATOL)


def assert_clipped_sum(model: nn.Module, oracle: OracleStep) -> None:
    """Every trainable ``p.grad`` is the oracle's Σ_b c_b ∇ℓ_b."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, name=name: f"{name}: {m}")


class Graph(nn.Module):
    """Named layers and a forward ``run(layers, x)`` over them (``layers``: the module's ``ModuleDict``)."""

    def __init__(self, run: Callable, **layers: nn.Module):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.run = run

    def forward(self, x):
        return self.run(self.layers, x)


class TwoHeads(nn.Module):
    """A LayerNorm'd trunk and two heads, of which the loss may use one."""

    def __init__(self, width=6, use_second=False):
        super().__init__()
        self.trunk, self.norm = nn.Linear(width, width), nn.LayerNorm(width)
        self.head, self.unused = nn.Linear(width, 3), nn.Linear(width, 3)
        self.use_second = use_second

    def forward(self, x):
        h = self.norm(torch.tanh(self.trunk(x)))
        second = self.unused(h)  # computed, hooked; reaches the loss only when use_second
        out = self.head(h).mean(dim=1)
        return out + second.mean(dim=1) if self.use_second else out
