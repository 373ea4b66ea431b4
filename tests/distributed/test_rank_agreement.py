"""Ranks that disagree on C, σ, the mode, the loss reduction or the sample rate are refused on every rank, at
``make_private`` and again at the first step (σ and C set on one rank's optimizer in between), with no parameter
changed; 2 gloo ranks (``FLASHNORM_DIST_BACKEND=nccl``: 2 GPUs), DDP and FSDP2.

Without the check, a rank with C = 1000 contributes samples up to 1000 to the summed step while the noise (drawn on
rank 0, or per owned shard) is sized for C = 1, and ranks with different σ record different ε.
"""

from __future__ import annotations

import functools
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from tests.distributed.workers import Case, build, launch_group, rank_device, run_in_group

BACKEND = os.environ.get("FLASHNORM_DIST_BACKEND", "gloo")
B = 4  # the global batch size (B / 2 samples per rank)

#: name → (wrapper, {make_private argument: (rank 0's value, rank 1's value)}, {optimizer attribute set after
#: make_private: per-rank values}, what every rank's error must say; None: the step must run).
CASES = {
    "agree": ("ddp", {}, {}, None),
    "fsdp-agree": ("fsdp", {}, {}, None),
    "clip": ("ddp", {"max_grad_norm": (1.0, 1000.0)}, {}, "max_grad_norm differs across ranks (from 1.0 to 1000.0)"),
    "sigma": ("ddp", {"noise_multiplier": (0.5, 1.0)}, {}, "noise_multiplier differs across ranks (from 0.5 to 1.0)"),
    "mode": ("ddp", {"grad_sample_mode": ("flash", "flash_fuse")}, {}, "grad_sample_mode differs across ranks"),
    "reduction": ("ddp", {"loss_reduction": ("mean", "sum")}, {}, "loss_reduction differs across ranks"),
    "sample-rate": ("ddp", {"repeat": (2, 4)}, {}, "sample_rate differs across ranks (from 0.25 to 0.5)"),
    "fsdp-clip": ("fsdp", {"max_grad_norm": (1.0, 1000.0)}, {}, "max_grad_norm differs across ranks"),
    "clip-set-after": ("ddp", {}, {"max_grad_norm": (1.0, 1000.0)}, "max_grad_norm differs across ranks"),
    "sigma-set-after": ("ddp", {}, {"noise_multiplier": (0.0, 2.0)}, "noise_multiplier differs across ranks"),
    "fsdp-clip-set-after": ("fsdp", {}, {"max_grad_norm": (1000.0, 1.0)}, "max_grad_norm differs across ranks"),
}
DEFAULTS = {"max_grad_norm": 1.0, "noise_multiplier": 0.0, "loss_reduction": "mean", "repeat": 2}


def _case(name: str, rank: int, device: torch.device) -> dict:
    from flashnorm import FlashNormPrivacyEngine
    from flashnorm.utils.fsdp_utils import FSDP2Wrapper

    wrapper, at_make_private, set_after, _ = CASES[name]
    kw = {**DEFAULTS, **{k: v[rank] for k, v in at_make_private.items()}}
    mode = kw.pop("grad_sample_mode", "flash_fuse_fsdp" if wrapper == "fsdp" else "flash_fuse")
    model, ids, targets = build(Case(name, wrapper, mode, sizes=(B // 2, B // 2)))
    model.to(device)
    if wrapper == "ddp":
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = FSDP2Wrapper(model, mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
    repeat = kw.pop("repeat")  # a loader of batch size B over `repeat` copies: sample rate 1 / repeat
    dataset = TensorDataset(ids.repeat(repeat, 1), targets.repeat(repeat))
    dp_model, optimizer, criterion, _ = FlashNormPrivacyEngine().make_private(
        module=wrapped, optimizer=torch.optim.SGD(wrapped.parameters(), lr=1.0),
        criterion=nn.CrossEntropyLoss(reduction=kw["loss_reduction"]), data_loader=DataLoader(dataset, batch_size=B),
        grad_sample_mode=mode, poisson_sampling=False, **kw,
    )
    for attr, values in set_after.items():
        setattr(optimizer, attr, values[rank])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    local = slice(rank * B // 2, (rank + 1) * B // 2)
    criterion(dp_model(ids[local].to(device)), targets[local].to(device)).backward()
    result = {}
    try:
        optimizer.step()
    except ValueError as err:  # refused at the step: the parameters must be as they were
        result["error"] = f"{type(err).__name__}: {err}"
    result["unchanged"] = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    return result


def _failed(err: Exception) -> dict:
    return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}


def _ranks(rank: int, world: int, init_file: str, out_dir: str) -> None:
    device = rank_device(BACKEND, rank)
    run_in_group(rank, world, BACKEND, init_file, out_dir,
                 {name: functools.partial(_case, name, rank, device) for name in CASES}, failed=_failed)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if BACKEND == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("FLASHNORM_DIST_BACKEND=nccl needs 2 CUDA GPUs")
    return launch_group(_ranks, 2, str(tmp_path_factory.mktemp("agree")))


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_agree_or_every_rank_refuses(results, name):
    message = CASES[name][3]
    for rank, res in enumerate(results):
        got = res[name]
        if message is None:
            assert "error" not in got, (rank, got.get("trace"))
            assert not got["unchanged"], rank  # the step ran
        else:
            assert message in got.get("error", ""), (rank, got)
            assert got["error"].startswith("ValueError"), (rank, got)
            if CASES[name][2]:  # refused at the first step: nothing changed
                assert got["unchanged"], rank
