"""White-box canaries that audit a real DP training run (the "gradient canaries" of Steinke, Nasr and Jagielski 2023).

[CanaryAudit][flashnorm.auditing.canaries.CanaryAudit] adds m canaries to a classification run. Each is a
training example of its own, included in the training set independently with probability ½, whose gradient lies
on one coordinate i of a *canary head* that no data example touches, with a norm far above C. Clipping makes every
canary's contribution exactly C·e_i, so a canary moves its own coordinate by lr·C / B each step it is sampled,
plus the step's noise, and nothing else moves it. Each canary's score is its coordinate's total movement; the
scores of the canaries that were in and of those that were out give the lower bounds ε̂ of
[bounds][flashnorm.auditing.bounds].

The run goes through the real pipeline: your loader (Poisson sampling by ``make_private``), your model (wrapped),
FlashNorm's or Opacus's clipping, the DP optimizer's noise and the engine's accountant. Only the canaries are added:

```python
audit = CanaryAudit(num_canaries=5000, max_grad_norm=1.0, seed=0)
model = audit.wrap_model(model)                   # model(x, canary_id) -> logits
loader = DataLoader(audit.wrap_dataset(train_set), batch_size=...)
model, optimizer, criterion, loader = engine.make_private(module=model, ..., data_loader=loader)
for x, y, canary_id in loader:
    criterion(model(x, canary_id), y).backward()
    optimizer.step()
    optimizer.zero_grad()
result = audit.result(delta=1e-5, epsilon=engine.get_epsilon(1e-5))
```

Requirements: the model maps x to class logits [B, k] (k ≥ 2) and the criterion is cross-entropy (any loss whose
gradient at all-zero logits with target class 0 has a non-zero class-0 entry works); the dataset yields ``(x, y)``
pairs of tensors. Plain SGD gives the strongest audit (movement is then linear in the clipped gradients); any
optimizer gives a valid one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .bounds import auroc, epsilon_one_run, epsilon_one_run_fdp, tpr_at_fpr

__all__ = ["AuditResult", "CanaryAudit", "CanaryDataset", "CanaryModel"]

#: The canary row's gradient norm is GAIN·C·(1 − 1/k) ≥ GAIN·C / 2: far above C, so clipping always binds.
GAIN = 100.0


class CanaryDataset(Dataset):
    """``dataset``'s ``(x, y)`` rows as ``(x, y, -1)``, then one row ``(0, 0, i)`` per included canary i.

    A canary row's input is zeros shaped like the first example's (the model's output on it is discarded) and its
    label is class 0.
    """

    def __init__(self, dataset: Dataset, canary_ids: torch.Tensor):
        self.dataset = dataset
        self.canary_ids = canary_ids.to(torch.int64)
        x0, y0 = dataset[0]
        self._x = torch.zeros_like(torch.as_tensor(x0))
        self._y = torch.zeros_like(torch.as_tensor(y0))

    def __len__(self) -> int:
        return len(self.dataset) + len(self.canary_ids)

    def __getitem__(self, index: int):
        if index < len(self.dataset):
            x, y = self.dataset[index]
            return x, y, torch.tensor(-1)
        return self._x, self._y, self.canary_ids[index - len(self.dataset)]


class CanaryModel(nn.Module):
    """``module`` plus a canary head: ``forward(x, canary_id) -> logits [B, k]``.

    The head is an ``nn.Linear(S, G, bias=False)`` with G·S ≥ m, zero at the start; canary i owns its weight
    W[i // S, i mod S]. Row b with ``canary_id[b] = i ≥ 0`` feeds the head x_b = GAIN·C·e_{i mod S} and reads
    s_b = h_b[i // S] − (the same, detached): s_b is 0 in value, and ∂s_b/∂W = GAIN·C·e_{i//S}e_{i mod S}ᵀ.
    Its logits are (s_b, 0, …, 0) and ``module``'s own output is multiplied by 0, so its per-sample gradient is
    non-zero on W[i // S, i mod S] alone. Data rows (``canary_id = -1``) feed the head zeros and keep ``module``'s
    logits: their gradient on the head is exactly 0. Every layer is an ordinary ``nn.Linear`` that every
    ``grad_sample_mode`` clips exactly.
    """

    def __init__(self, module: nn.Module, num_canaries: int, max_grad_norm: float):
        super().__init__()
        self.module = module
        self.num_canaries = num_canaries
        self.slots = math.ceil(math.sqrt(num_canaries))
        groups = math.ceil(num_canaries / self.slots)
        self.canary_head = nn.Linear(self.slots, groups, bias=False)
        nn.init.zeros_(self.canary_head.weight)
        self.gain = GAIN * float(max_grad_norm)

    def canary_weights(self) -> torch.Tensor:
        """The m canary coordinates, [m] (a copy, float64 on the CPU). Under FSDP2 a collective: call on every rank."""
        weight = self.canary_head.weight.detach()
        if hasattr(weight, "full_tensor"):  # a DTensor shard (FSDP2)
            weight = weight.full_tensor()
        flat = weight.double().cpu().flatten()
        return flat[: self.num_canaries].clone()

    def forward(self, x: torch.Tensor, canary_id: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        canary_id = canary_id.to(out.device)
        is_canary = canary_id >= 0
        index = canary_id.clamp_min(0)
        slot = nn.functional.one_hot(index % self.slots, self.slots).to(out.dtype)
        head_in = slot * (self.gain * is_canary.to(out.dtype)).unsqueeze(1)
        h = self.canary_head(head_in).gather(1, (index // self.slots).unsqueeze(1)).squeeze(1)
        s = h - h.detach()
        logits = out * (~is_canary).to(out.dtype).unsqueeze(1)
        return torch.cat([logits[:, :1] + s.unsqueeze(1), logits[:, 1:]], dim=1)


@dataclass
class AuditResult:
    """What [CanaryAudit.result][flashnorm.auditing.canaries.CanaryAudit.result] measured.

    Attributes:
        epsilon: the accountant's ε (``None`` when not given).
        epsilon_lower: ε̂ of [epsilon_one_run][flashnorm.auditing.bounds.epsilon_one_run].
        epsilon_lower_fdp: ε̂ of [epsilon_one_run_fdp][flashnorm.auditing.bounds.epsilon_one_run_fdp].
        delta: the δ both are for.
        significance: their significance level.
        auroc: the attack's AUROC.
        tpr_at_1pct_fpr: its TPR at 1% FPR.
        in_scores: the scores of the canaries that were in, [m_in].
        out_scores: those of the canaries that were out, [m_out].
    """

    epsilon: Optional[float]
    epsilon_lower: float
    epsilon_lower_fdp: float
    delta: float
    significance: float
    auroc: float
    tpr_at_1pct_fpr: float
    in_scores: np.ndarray = field(repr=False)
    out_scores: np.ndarray = field(repr=False)

    @property
    def passed(self) -> bool:
        """Both lower bounds at most the accountant's ε (``True`` when no ε was given). Each bound fails a correct
        pipeline with probability at most ``significance``, so both together at most twice that."""
        return self.epsilon is None or max(self.epsilon_lower, self.epsilon_lower_fdp) <= self.epsilon

    def __str__(self) -> str:
        claim = "—" if self.epsilon is None else f"{self.epsilon:.3f}"
        return (f"ε (accountant) {claim}, ε̂ one-run {self.epsilon_lower:.3f}, ε̂ f-DP {self.epsilon_lower_fdp:.3f} "
                f"(δ = {self.delta:g}, significance {self.significance:g})\n"
                f"AUROC {self.auroc:.3f}, TPR at 1% FPR {self.tpr_at_1pct_fpr:.3f}, "
                f"{len(self.in_scores)} canaries in, {len(self.out_scores)} out")


class CanaryAudit:
    """m white-box canaries for one training run; see the module's introduction for the workflow.

    Args:
        num_canaries: m. More canaries give a tighter f-DP bound; about 1,000 to 50,000 is practical (each
            included canary is one training row; the head has m weights).
        max_grad_norm: the run's clipping bound C (it scales the canaries' gradients far above C).
        seed: seeds the draw of which canaries are included, with probability ½ each.
    """

    def __init__(self, num_canaries: int, *, max_grad_norm: float, seed: int = 0):
        if num_canaries < 2:
            raise ValueError(f"num_canaries must be at least 2, got {num_canaries}.")
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm}.")
        self.num_canaries = num_canaries
        self.max_grad_norm = float(max_grad_norm)
        generator = torch.Generator().manual_seed(seed)
        #: which canaries are in the training set, [m] bool; the auditor's secret until scoring
        self.included = torch.rand(num_canaries, generator=generator) < 0.5
        self.model: Optional[CanaryModel] = None
        self._start: Optional[torch.Tensor] = None

    @property
    def included_ids(self) -> torch.Tensor:
        """The ids of the included canaries, ascending."""
        return torch.nonzero(self.included).flatten()

    def wrap_dataset(self, dataset: Dataset) -> CanaryDataset:
        """``dataset`` with one row per included canary appended; rows become ``(x, y, canary_id)``."""
        return CanaryDataset(dataset, self.included_ids)

    def wrap_model(self, model: nn.Module) -> CanaryModel:
        """``model`` with the canary head (call before ``make_private``; pass the result to it)."""
        if self.model is not None:
            raise RuntimeError("wrap_model was already called: one CanaryAudit audits one model.")
        self.model = CanaryModel(model, self.num_canaries, self.max_grad_norm)
        self._start = self.model.canary_weights()
        return self.model

    def scores(self) -> np.ndarray:
        """Each canary's score, [m]: its coordinate's movement since ``wrap_model`` (higher: more likely in)."""
        if self.model is None:
            raise RuntimeError("Call wrap_model (and train) before scoring.")
        return (self.model.canary_weights() - self._start).numpy()

    def result(self, delta: float, *, epsilon: Optional[float] = None, significance: float = 0.05,
               scores: Optional[np.ndarray] = None) -> AuditResult:
        """The audit of the run so far: ε̂ (both bounds, default thresholds), AUROC and TPR at 1% FPR.

        Args:
            delta: the δ at which to bound ε (use the δ you report ε at).
            epsilon: the accountant's ε at ``delta``, e.g. ``engine.get_epsilon(delta)``, to compare with.
            significance: the bounds' significance level.
            scores: other scores for the canaries, [m]; default: each canary's movement
                ([scores][flashnorm.auditing.canaries.CanaryAudit.scores]).
        """
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}.")
        scores = self.scores() if scores is None else np.asarray(scores, dtype=np.float64)
        if scores.shape != (self.num_canaries,):
            raise ValueError(f"scores must have shape ({self.num_canaries},), got {scores.shape}.")
        included = self.included.numpy()
        ins, outs = scores[included], scores[~included]
        return AuditResult(
            epsilon=epsilon,
            epsilon_lower=epsilon_one_run(ins, outs, significance=significance, delta=delta),
            epsilon_lower_fdp=epsilon_one_run_fdp(ins, outs, significance=significance, delta=delta),
            delta=delta, significance=significance,
            auroc=auroc(ins, outs), tpr_at_1pct_fpr=float(tpr_at_fpr(ins, outs, 0.01)),
            in_scores=ins, out_scores=outs,
        )
