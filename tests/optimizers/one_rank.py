"""One DP step with and without a process group of one rank: what the distributed optimizers' tests compare."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from tests.grad_sample.guarantee import make_private, step

SIGMA, CLIP = 0.7, 0.3


class Blocks(nn.Module):
    """Two residual MLP blocks in a ``ModuleList`` (FSDP2Wrapper's units), mean over T, a Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 6)) for _ in range(2)])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(dim=1))


def noisy_step(mode: str, reduction: str, wrap=None) -> Tuple[torch.optim.Optimizer, Dict[str, torch.Tensor]]:
    """One step of σ = 0.7, C = 0.3 (clipping active) with a seeded noise generator on a fresh `Blocks`, the
    module being ``wrap(model)`` when given: (the DP optimizer, the parameters after the step, full tensors)."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 5, 6), torch.randint(0, 3, (8,))
    model = Blocks()
    module: Optional[nn.Module] = wrap(model) if wrap is not None else model
    private = make_private(module, mode, clip=CLIP, sigma=SIGMA, data=(x, y), reduction=reduction,
                          criterion=nn.CrossEntropyLoss(reduction=reduction),
                          noise_generator=torch.Generator().manual_seed(3))
    step(private, x[:4], y[:4])
    full = {name: p.full_tensor() if hasattr(p, "full_tensor") else p for name, p in model.named_parameters()}
    return private.optimizer, {name: p.detach().clone() for name, p in full.items()}


def assert_same_step(params: Dict[str, torch.Tensor], single: Dict[str, torch.Tensor]) -> None:
    """The same parameters after the step, up to float32 rounding (the noise, std σ·C/B ≈ 0.05, far above it)."""
    assert params.keys() == single.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, single[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
