"""What the spawned ranks run: one DP step per case through the public API, results saved for the test.

A `Case` describes a step on W ranks; `run_cases` (the body of every rank) runs a list of
them in one process group and each rank saves ``{case name: {...}}`` to ``<out>/rank<r>.pt``. The
pytest process compares the saved gradients with the float64 microbatch oracle on the union batch.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

STEPS, CLASSES = 5, 3


@dataclass(frozen=True)
class Case:
    """One distributed DP step. ``sizes``: the local batch size of each rank (their sum is B_global)."""

    name: str
    wrapper: str  # "ddp", "dpddp", "fsdp" or "fsdp-leaf" (also blocks[0].fc1 is an FSDP2 unit)
    mode: str
    sizes: Tuple[int, ...] = (3, 5)
    reduction: str = "mean"
    clip: float = 0.05  # active for these models (per-sample norms are O(1)); 1e10 = inactive
    sigma: float = 0.0
    frozen: bool = False  # blocks[0].fc1 frozen
    bf16: bool = False  # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
    wide: bool = False  # ≥ 50k trainable elements, for noise statistics
    norm_method: Optional[str] = None  # FLASHNORM_NORM_METHOD for this case
    poisson: bool = False  # local batches drawn by Opacus's distributed Poisson loader (sizes: ignored)
    secure: bool = False  # secure_mode's noise sampler (a seeded generator stands in for the CSPRNG)
    shard_dim1: bool = False  # FSDP2 shards matrices along dim 1, not its default layout (even widths)
    rank_batch: bool = False  # the loader's batch size differs across ranks (make_private must refuse)
    leak: bool = False  # from the second step on, the head's weight is also read outside the head (must refuse)
    tied: bool = False  # blocks[1].fc1 shares blocks[0].fc1's weight (two layers, one parameter)
    warm: bool = False  # a clipped backward on the same batch first (no optimizer step): its batch sizes are known
    seed: int = 0

    @property
    def batch(self) -> int:
        return sum(self.sizes)


class Block(nn.Module):
    """Pre-norm residual MLP block: h + fc2(tanh(fc1(LN(h)))); holds no parameter directly."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, h):
        return h + self.fc2(torch.tanh(self.fc1(self.ln(h))))


class TinyLM(nn.Module):
    """Embedding → 2 blocks (a ``ModuleList``: FSDP2Wrapper's units) → LayerNorm → mean over T → Linear head.

    Odd widths, so that FSDP2's dim-0 shards are uneven across 2 ranks.
    """

    def __init__(self, vocab: int = 13, d: int = 7, hidden: int = 9):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, hidden) for _ in range(2)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)
        self.leak = False

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        z = self.norm(h).mean(dim=1)
        return self.head(z) + nn.functional.linear(z, self.head.weight) if self.leak else self.head(z)


def build(case: Case):
    """(model, ids [B_global, STEPS], targets [B_global]): the same on every rank and in the test process."""
    torch.manual_seed(case.seed)
    vocab, d, hidden = (31, 65, 383) if case.wide else (13, 7, 9)
    if case.shard_dim1:  # FSDP2 shards dim 1 evenly only
        d, hidden = d + 1, hidden + 1
    model = TinyLM(vocab, d, hidden)
    if case.frozen:
        model.blocks[0].fc1.requires_grad_(False)
    if case.tied:
        model.blocks[1].fc1.weight = model.blocks[0].fc1.weight
    ids = torch.randint(0, model.embed.num_embeddings, (case.batch, STEPS))
    targets = torch.randint(0, CLASSES, (case.batch,))
    return model, ids, targets


def sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ_b: cross-entropy of one sample (the oracle's per-sample loss)."""
    return nn.functional.cross_entropy(out.float() if out.dtype == torch.bfloat16 else out, target, reduction="sum")


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().double().cpu()


def run_case(case: Case, device: torch.device) -> Dict:
    """One DP step; returns the applied gradients, updated parameters and local norms (float64, CPU)."""
    from flashnorm import FlashNormPrivacyEngine
    from flashnorm.utils.fsdp_utils import FSDP2Wrapper

    rank = dist.get_rank()
    if case.norm_method:
        os.environ["FLASHNORM_NORM_METHOD"] = case.norm_method
    else:
        os.environ.pop("FLASHNORM_NORM_METHOD", None)
    model, ids, targets = build(case)
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    model.to(device)
    ddp_reductions = []  # DDP's own bucket all-reduces (there must be none: FlashNorm reduces once, noise included)
    if case.wrapper == "ddp":
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        def counted_allreduce(group, bucket):
            ddp_reductions.append(bucket.index())
            return allreduce_hook(group, bucket)

        wrapped.register_comm_hook(None, counted_allreduce)
    elif case.wrapper == "dpddp":
        wrapped = DPDDP(model)
    else:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if case.bf16 else None
        layout = dict(shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None) if case.shard_dim1 else {}
        # the mesh on the case's device: FSDP2's default mesh would take cuda:0 on a GPU host even under gloo
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        if case.wrapper == "fsdp-leaf":
            fully_shard(model.blocks[0].fc1, mesh=mesh)
        wrapped = FSDP2Wrapper(model, mp_policy=policy, mesh=mesh, **layout)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=1.0)
    # A loader over the 2·B_global samples (ids twice) with batch size B_global: Opacus's expected batch
    # size is B_global (sampling rate 1/2), divided by W for the per-worker value it gives the optimizer.
    dataset = TensorDataset(torch.cat([ids, ids]), torch.cat([targets, targets]), torch.arange(2 * case.batch))
    generator = torch.Generator(device=device).manual_seed(1234) if case.sigma > 0 else None
    engine = FlashNormPrivacyEngine()
    if case.secure:  # torchcsprng is not installed: secure_mode's code path with a seeded generator
        engine.secure_mode, engine.secure_rng, generator = True, generator, None
    dp_model, dp_opt, criterion, loader = engine.make_private(
        module=wrapped, optimizer=optimizer, criterion=nn.CrossEntropyLoss(reduction=case.reduction),
        data_loader=DataLoader(dataset, batch_size=case.batch * (1 + rank if case.rank_batch else 1), shuffle=True),
        noise_multiplier=case.sigma, max_grad_norm=case.clip,
        loss_reduction=case.reduction, grad_sample_mode=case.mode, poisson_sampling=case.poisson,
        noise_generator=generator,
    )
    if case.poisson:
        x, y, index = next(iter(loader))
    else:
        start = sum(case.sizes[:rank])
        index = torch.arange(start, start + case.sizes[rank])
        x, y = ids[index], targets[index]
    x, y = x.to(device), y.to(device)
    if case.leak:  # a clean first step, then the head's weight is read outside the head too
        criterion(dp_model(x), y).backward()
        dp_opt.step()
        dp_opt.zero_grad()
        model.leak = True
    if case.warm:  # a rank of one sample after one: the step takes the one-sample path (forward hooks parked)
        criterion(dp_model(x), y).backward()
        dp_opt.zero_grad(set_to_none=True)
    out = dp_model(x)
    parked = dp_model.hooks.parked
    criterion(out.float() if out.dtype == torch.bfloat16 else out, y).backward()
    norms = dp_model.get_norm_sample().detach().double().cpu() if len(index) else torch.zeros(0)
    dp_opt.step()
    named = dict(model.named_parameters())
    return {
        "class": type(dp_model).__name__,
        "ddp_reductions": len(ddp_reductions),
        "optimizer": type(dp_opt).__name__,
        "parked": parked,
        "index": index,  # this rank's samples, in the dataset of ids twice
        "norms": norms,
        "grads": {n: _full(p.grad) for n, p in named.items() if p.requires_grad},
        "params": {n: _full(p) for n, p in named.items()},
        "before": before,
    }


def rank_device(backend: str, rank: int) -> torch.device:
    """This rank's device: under NCCL its GPU (made the current one), else the CPU."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _traceback_of(err: Exception) -> Dict:
    return {"error": traceback.format_exc()}


def run_in_group(rank: int, world: int, backend: str, init_file: str, out_dir: str,
                 jobs: Dict[str, Callable[[], Dict]], failed: Callable[[Exception], Dict] = _traceback_of) -> None:
    """The body every spawned or forked rank of the tests shares: one process group (``init_file``'s rendezvous,
    120 s timeout), each of ``jobs`` (name → job) in order with a barrier after it, ``{name: result}`` saved to
    ``out_dir/rank<r>.pt`` however the loop ends.

    A job that raises records ``failed(err)`` (called inside the ``except``: default, its traceback under "error")
    and the next job runs; a job that raised on one rank only would desynchronise the collectives, so the group's
    timeout ends the run. The rank's stdout and stderr (file descriptors, so native aborts too) go to
    ``out_dir/rank<r>.log``, with every thread's Python stack written there if the process dies of a signal.
    """
    log = os.open(os.path.join(out_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    faulthandler.enable(all_threads=True)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = {}
    try:
        for name, job in jobs.items():
            try:
                results[name] = job()
            except Exception as err:  # noqa: BLE001 - reported by the test of that job
                results[name] = failed(err)
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def launch_group(body: Callable[..., None], world: int, out_dir: str, *args, start_method: str = "spawn") -> List[Dict]:
    """Runs ``body(rank, world, init_file, out_dir, *args)`` (a `run_in_group` body) on ``world`` processes and
    returns each rank's saved ``{job name: result}``.

    A job's Python error is a result (`run_in_group`), and an error outside the jobs (the group's timeout) fails the
    test with the rank's traceback. A rank killed by a signal died in native code instead (an abort in the collective
    library's threads, seen once in CI and not reproduced): its run's rank logs go into a warning and the launch is
    made once more from a fresh rendezvous; a second such death fails the test with them. The jobs and what their
    tests assert are the same either way: the second launch recomputes every result.
    """
    import torch.multiprocessing as mp

    for attempt in (1, 2):
        init_file = os.path.join(out_dir, f"init{attempt}")
        try:
            mp.start_processes(body, args=(world, init_file, out_dir, *args), nprocs=world, join=True,
                               start_method=start_method)
            return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
        except mp.ProcessExitedException as error:
            logs = rank_logs(out_dir, world)
            if attempt == 2:
                pytest.fail(f"{error} (launched twice)\n{logs}")
            warnings.warn(f"{error}; launching the ranks once more\n{logs}", RuntimeWarning, stacklevel=2)
    raise AssertionError("unreachable")


def rank_logs(out_dir, world: int, chars: int = 4000) -> str:
    """The last ``chars`` of each rank's ``out_dir/rank<r>.log``, one section per rank that wrote one."""
    sections = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.log")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                sections.append(f"--- rank {r} ---\n{f.read()[-chars:]}")
    return "\n".join(sections)


def run_cases(rank: int, world: int, init_file: str, out_dir: str, backend: str, cases: List[Case]) -> None:
    """Body of every rank: one process group, every case in order, results to ``out_dir/rank<r>.pt``
    (`run_in_group`)."""
    device = rank_device(backend, rank)
    run_in_group(rank, world, backend, init_file, out_dir,
                 {case.name: functools.partial(run_case, case, device) for case in cases})


@dataclass
class Launch:
    """Spawns ``world`` ranks running `run_cases`; ``results[r][case name]`` afterwards."""

    backend: str
    world: int = 2
    results: List[Dict] = field(default_factory=list)

    def run(self, cases: List[Case], tmp_dir: str) -> "Launch":
        self.results = launch_group(run_cases, self.world, tmp_dir, self.backend, cases)
        return self
