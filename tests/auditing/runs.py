"""The audited training runs of the CI self-audit and of the docs table (``python -m tests.auditing.report``).

One run: 256 random examples of a 4-class task plus the included canaries of a ``CanaryAudit`` with 20,000
canaries (each in with probability ½), Poisson sampling at q = ½ for one epoch (2 steps), plain SGD (lr 1),
C = 1, and σ from Opacus's PRV accountant for the target ε at δ = 10⁻⁵. Each canary's score is its coordinate's
movement, so an in canary moves by (number of steps it was sampled) + noise, in units of lr·C / B.

The broken pipelines are built here, in the tests, from public pieces (``make_private``'s arguments, a loader,
``torch.distributed``), never in the library. Distributed runs fork their ranks from the test process (as
PyTorch's DataLoader forks its workers): gloo on the CPU, every case of a launch in one process group.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from opacus.accountants import create_accountant
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from scipy.special import logsumexp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset, TensorDataset

from flashnorm import PrivacyEngine
from flashnorm.auditing import AuditResult, CanaryAudit
from tests.distributed.workers import launch_group, run_in_group

DELTA = 1e-5
CANARIES = 20_000
SAMPLE_RATE = 0.5
STEPS = 2  # one epoch
CLIP = 1.0
LR = 1.0
EPSILONS = (1.0, 2.0, 4.0, 8.0)
MODES = ("ghost", "flash", "flash_fuse")
DISTRIBUTED_MODES = {"ddp": MODES, "fsdp": ("ghost_fsdp", "flash_fsdp", "flash_fuse_fsdp")}
EXAMPLES = 256


#: σ for ε ≈ 1, 2, 4, 8 at δ = 10⁻⁵ after one epoch at q = ½ (Opacus's PRV accountant; each run reports the
#: engine's own ε, which ``test_self_audit`` checks is within 2% of the nominal one).
NOISE = {1.0: 3.2, 2.0: 1.9, 4.0: 1.15, 8.0: 0.71}


def noise_for(epsilon: float) -> float:
    """σ of the runs at nominal ε = ``epsilon``."""
    return NOISE[epsilon]


@functools.lru_cache(maxsize=None)
def reported_epsilon(noise_multiplier: float, sample_rate: float = SAMPLE_RATE) -> float:
    """The ε a pipeline reports for σ = ``noise_multiplier``: Opacus's PRV accountant after this run's steps."""
    accountant = create_accountant("prv")
    for _ in range(STEPS):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(DELTA)


def setup(seed: int = 0):
    """(audit, model with the canary head, dataset with the included canaries): the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(EXAMPLES, 8, generator=generator),
                         torch.randint(0, 4, (EXAMPLES,), generator=generator))
    torch.manual_seed(seed)
    audit = CanaryAudit(CANARIES, max_grad_norm=CLIP, seed=seed)
    model = audit.wrap_model(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)))
    return audit, model, audit.wrap_dataset(data)


def loader_for(dataset, *, shuffle: bool = False) -> DataLoader:
    """Batches of ⌈N·q⌉ rows: Opacus's Poisson loader then samples at 1 / len(loader) = q."""
    return DataLoader(dataset, batch_size=math.ceil(len(dataset) * SAMPLE_RATE), shuffle=shuffle)


@dataclass
class Run:
    """What an audited run leaves: the canaries' coordinates after each step and the ε the pipeline reports."""

    seed: int
    claimed: float
    trace: np.ndarray  # [steps + 1, m]

    def scores(self) -> np.ndarray:
        """Total movement of each canary's coordinate, [m]."""
        return self.trace[-1] - self.trace[0]

    def result(self, scores: Optional[np.ndarray] = None) -> AuditResult:
        """The audit (both bounds, default thresholds) against the reported ε."""
        audit = CanaryAudit(CANARIES, max_grad_norm=CLIP, seed=self.seed)
        return audit.result(DELTA, epsilon=self.claimed, scores=self.scores() if scores is None else scores)


def train(audit, model, optimizer, criterion, loader, after_step=None) -> np.ndarray:
    """One epoch; returns the canary coordinates before and after each step, [steps + 1, m]."""
    trace = [audit.model.canary_weights().numpy()]
    for x, y, canary_id in loader:
        criterion(model(x, canary_id), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step(model)
        trace.append(audit.model.canary_weights().numpy())
    return np.stack(trace)


def private(engine, model, loader, mode: str, noise_multiplier: float, max_grad_norm: float, noise_seed: int,
            poisson: bool = True):
    """``make_private`` with SGD and cross-entropy; (model, optimizer, criterion, loader) for every mode."""
    criterion = nn.CrossEntropyLoss()
    out = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), criterion=criterion, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, grad_sample_mode=mode,
        poisson_sampling=poisson, noise_generator=torch.Generator().manual_seed(noise_seed),
    )
    if len(out) == 3:  # Opacus's own modes return no criterion: the loss is the plain one
        return (out[0], out[1], criterion, out[2])
    return out


def single_run(mode: str, epsilon: float, *, seed: int = 0, noise_multiplier: Optional[float] = None,
               max_grad_norm: float = CLIP, poisson: bool = True, claimed: Optional[float] = None) -> Run:
    """One audited run in one process. By default a correct one: σ for ``epsilon``, clipping at C, Poisson
    sampling, and the engine's ε as the claim. The keywords build the broken variants."""
    sigma = noise_for(epsilon) if noise_multiplier is None else noise_multiplier
    audit, model, dataset = setup(seed)
    engine = PrivacyEngine()
    model, optimizer, criterion, loader = private(engine, model, loader_for(dataset, shuffle=not poisson), mode,
                                                  sigma, max_grad_norm, seed + 1, poisson)
    trace = train(audit, model, optimizer, criterion, loader)
    return Run(seed, engine.get_epsilon(DELTA) if claimed is None else claimed, trace)


# -- broken pipelines (one process) ----------------------------------------------------------------------------

def low_noise_run(mode: str, epsilon: float, seed: int = 0) -> Run:
    """Noise σ/4 while ε is reported for σ."""
    sigma = noise_for(epsilon)
    return single_run(mode, epsilon, seed=seed, noise_multiplier=sigma / 4, claimed=reported_epsilon(sigma))


def unclipped_run(mode: str, epsilon: float, seed: int = 0) -> Run:
    """Clipping disabled (C = 10⁶, far above every gradient) with the noise σ·C of C = 1 and ε reported for σ."""
    sigma = noise_for(epsilon)
    huge = 1e6
    return single_run(mode, epsilon, seed=seed, max_grad_norm=huge * CLIP, noise_multiplier=sigma * CLIP / huge,
                      claimed=reported_epsilon(sigma))


def shuffled_run(mode: str, epsilon: float, seed: int = 0) -> Run:
    """Fixed-size batches of a loader reshuffled each epoch (``poisson_sampling=False``), reported as Poisson."""
    return single_run(mode, epsilon, seed=seed, poisson=False)


#: The shuffled-once run: batches of 5 rows in one fixed shuffled order (≈ 2,040 batches), kept for 8 epochs, σ = ½.
#: Reported as Poisson at q = 1/2,040 over ≈ 16,300 steps (ε ≈ 3.8); the simulations of ``simulations.py`` give the
#: audit of such a run ≈ 140% of that. About 25 s on one CPU thread.
SHUFFLED_ONCE_SIGMA = 0.5
SHUFFLED_ONCE_BATCH = 5
SHUFFLED_ONCE_EPOCHS = 8


def shuffled_once_run(mode: str, seed: int = 0) -> AuditResult:
    """Batches shuffled once and kept every epoch (a loader over a fixed permutation, ``poisson_sampling=False``),
    with the ε of Poisson sampling at q = 1 / (batches per epoch) reported.

    Each canary lies in the same batch slot t every epoch, so the sum of its coordinate's movements at slot t over
    the E epochs, v_t (in units of lr·C / B), is E + noise when it is in and noise when it is out. Its score is
    log Σ_t exp((v_t − E/2) / (E·σ²)): a soft maximum over the slots, the statistic the simulations measure. The
    direction (in canaries score higher) is fixed before the run, so the bound's significance holds as stated.
    """
    audit, model, dataset = setup(seed)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 2)).tolist()
    loader = DataLoader(Subset(dataset, order), batch_size=SHUFFLED_ONCE_BATCH, shuffle=False)
    engine = PrivacyEngine()
    model, optimizer, criterion, loader = private(engine, model, loader, mode, SHUFFLED_ONCE_SIGMA, CLIP, seed + 1,
                                                  poisson=False)
    unit = LR * CLIP / SHUFFLED_ONCE_BATCH
    slots = np.zeros((len(loader), CANARIES))  # v_t for every canary
    before = audit.model.canary_weights().numpy().copy()
    for _ in range(SHUFFLED_ONCE_EPOCHS):
        for slot, (x, y, canary_id) in enumerate(loader):
            criterion(model(x, canary_id), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            after = audit.model.canary_weights().numpy().copy()
            slots[slot] += (after - before) / unit
            before = after
    epochs = SHUFFLED_ONCE_EPOCHS
    scores = logsumexp((slots - epochs / 2) / (epochs * SHUFFLED_ONCE_SIGMA**2), axis=0)
    return audit.result(DELTA, epsilon=engine.get_epsilon(DELTA), scores=scores)


def shuffle_scores(run: Run, noise_multiplier: float) -> np.ndarray:
    """Per-step scores for a shuffled run: log of the likelihood ratio of "sampled exactly once this epoch" to
    "never", from each step's movement x_t (in units of lr·C / B): log mean_t exp((x_t − ½) / σ²)."""
    unit = LR * CLIP / int((EXAMPLES + int(CanaryAudit(CANARIES, max_grad_norm=CLIP, seed=run.seed).included.sum()))
                           * SAMPLE_RATE)
    x = np.diff(run.trace, axis=0) / unit
    return logsumexp((x - 0.5) / noise_multiplier**2, axis=0) - math.log(len(x))


# -- distributed runs --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A distributed run. ``kind``: ``"ddp"``, ``"fsdp"`` or ``"dpddp"`` (the module wrapped with PyTorch's DDP,
    FlashNorm's FSDP2Wrapper or Opacus's DPDDP; correct), or the broken ``"every_rank"`` (each rank adds the full
    noise σ·C) and ``"shares"`` (each rank adds a share σ·C / W)."""

    name: str
    kind: str
    mode: str
    epsilon: float
    seed: int = 0


def _distributed_run(case: Case, world: int) -> Dict:
    from flashnorm.utils.fsdp_utils import FSDP2Wrapper
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    sigma = noise_for(case.epsilon)
    audit, model, dataset = setup(case.seed)
    engine = PrivacyEngine()
    if case.kind in ("ddp", "fsdp", "dpddp"):
        if case.kind == "fsdp":
            wrapped = FSDP2Wrapper(model, mesh=init_device_mesh("cpu", (world,)))
        else:
            wrapped = DDP(model) if case.kind == "ddp" else DPDDP(model)
        model, optimizer, criterion, loader = private(engine, wrapped, loader_for(dataset), case.mode, sigma, CLIP,
                                                      case.seed + 1)
        trace = train(audit, model, optimizer, criterion, loader)
        return {"trace": trace, "claimed": engine.get_epsilon(DELTA) if rank == 0 else None}  # rank 0's is read
    # Broken: every rank runs the single-process pipeline on its rows and adds noise itself; the ranks average their
    # parameters after each step (the mean of their updates, as DDP's averaged gradients would give).
    shares = {"every_rank": 1.0, "shares": 1.0 / world}[case.kind]
    torch.manual_seed(case.seed * 1000 + rank)  # each rank's own Poisson draws
    rows = Subset(dataset, range(rank, len(dataset), world))
    model, optimizer, criterion, loader = private(engine, model, loader_for(rows), case.mode, sigma * shares, CLIP,
                                                  case.seed + 1 + rank)

    def average(module):
        with torch.no_grad():
            for p in module.parameters():
                dist.all_reduce(p)
                p /= world

    trace = train(audit, model, optimizer, criterion, loader, after_step=average)
    return {"trace": trace, "claimed": reported_epsilon(sigma)}


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, cases: Sequence[Case]) -> None:
    torch.set_num_threads(1)  # a forked child (as DataLoader workers do)
    run_in_group(rank, world, "gloo", init_file, out_dir,
                 {case.name: functools.partial(_distributed_run, case, world) for case in cases})


def launch(cases: List[Case], world: int, tmp_dir: str) -> Dict[str, Dict]:
    """Runs ``cases`` on ``world`` forked gloo ranks; rank 0's results by case name."""
    if dist.is_initialized():
        raise RuntimeError("launch forks its ranks: call it from a process that has no process group of its own.")
    os.makedirs(tmp_dir, exist_ok=True)
    return launch_group(_rank_main, world, tmp_dir, cases, start_method="fork")[0]


def distributed_result(case: Case, res: Dict) -> AuditResult:
    if "error" in res:
        raise RuntimeError(f"case {case.name} raised on rank 0:\n{res['error']}")
    return Run(case.seed, res["claimed"], res["trace"]).result()
