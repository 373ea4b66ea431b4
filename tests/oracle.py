"""Ground truth: a float64 microbatch loop with ordinary autograd (never a mode of this library).

For each sample b alone: ℓ_b, g_b = ∇ℓ_b, n_b = ‖g_b‖, c_b = min(1, C / (n_b + 1e-6)); the
clipped sum Σ_b c_b g_b is what a DP step adds noise to.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn as nn


@dataclass
class OracleStep:
    norms: torch.Tensor  # [B] float64
    clipped_sum: Dict[str, torch.Tensor]  # parameter name -> Σ_b c_b g_b (float64)
    param_norms: Dict[str, torch.Tensor]  # parameter name -> ‖∇_θ ℓ_b‖ [B] (float64)


def microbatch_reference(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_grad_norm: float,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda model, x: model(x),
) -> OracleStep:
    """Runs a float64 copy of ``model`` on one sample at a time.

    Args:
        inputs: batch first, [B, ...].
        sample_loss: ``(output of one sample [1, ...], target [1, ...]) -> scalar`` loss ℓ_b.
        forward: runs the model on one sample's ``[1, ...]`` input (e.g. to transpose for a
            sequence-first model).
    """
    ref = copy.deepcopy(model).double()
    params = {name: p for name, p in ref.named_parameters() if p.requires_grad}
    clipped = {name: torch.zeros_like(p) for name, p in params.items()}
    norms, param_norms = [], {name: [] for name in params}
    for b in range(inputs.shape[0]):
        x = inputs[b : b + 1]
        x = x.double() if x.is_floating_point() else x
        loss = sample_loss(forward(ref, x), targets[b : b + 1])
        for p in params.values():  # an ordinary backward (reentrant checkpointing refuses autograd.grad)
            p.grad = None
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params.values()]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        for name, g in zip(params, grads):
            clipped[name] += coef * g
            param_norms[name].append(g.norm())
        norms.append(norm)
    empty = torch.zeros(0, dtype=torch.float64)
    return OracleStep(torch.stack(norms) if norms else empty, clipped,
                      {name: torch.stack(n) if n else empty for name, n in param_norms.items()})


def assert_sequence_first_step_matches_float64(model, x, y, mode: str, clip: float = 1e-2) -> None:
    """One DP step of ``model`` made private with ``batch_first=False`` on ``x`` [T, B, ...] and labels ``y`` [B]
    (cross-entropy, ``sum``, noise 0): the per-sample norms and the applied gradients equal the float64 microbatch
    loop's, which runs each sample as [T, 1, ...]."""
    import torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset

    from flashnorm import FlashNormPrivacyEngine
    from tests.conftest import TOLERANCES

    oracle = microbatch_reference(
        model, x.transpose(0, 1), y, lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum"), clip,
        forward=lambda m, xb: m(xb.transpose(0, 1)),
    )
    dp_model, dp_opt, criterion, _ = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x.transpose(0, 1), y), batch_size=x.shape[1]),
        criterion=nn.CrossEntropyLoss(reduction="sum"), noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode=mode, loss_reduction="sum", batch_first=False,
    )
    criterion(dp_model(x), y).backward()
    rtol, atol = TOLERANCES["fp64"]
    torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=rtol, atol=atol)
    dp_opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=rtol, atol=atol)
