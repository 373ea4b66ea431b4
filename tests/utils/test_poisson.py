"""Poisson sampling under data parallelism: every rank takes every draw, its share of one shared sample."""

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from flashnorm.utils.poisson import RankShareSampler


def _draws(rank, world, seed=7, n=40, q=0.05):
    sampler = RankShareSampler(num_samples=n, sample_rate=q, generator=torch.Generator().manual_seed(seed),
                               rank=rank, world_size=world)
    return list(sampler)


def test_every_rank_takes_every_draw_and_the_shares_make_up_the_draw():
    """At q = 0.05 over 40 examples some ranks' shares are empty: each rank still yields all 1/q draws, the
    shares are disjoint and together they are the single-rank draw of the same seed."""
    whole = _draws(0, 1)
    shares = [_draws(rank, 3) for rank in range(3)]
    assert len(whole) == 20 and all(len(share) == 20 for share in shares)
    assert any(len(batch) == 0 for share in shares for batch in share), "the test needs empty shares"
    for step, draw in enumerate(whole):
        parts = [share[step] for share in shares]
        assert sorted(i for part in parts for i in part) == sorted(draw)


@pytest.mark.parametrize("mode", ["ghost", "flash_fuse"])
def test_make_private_under_ddp_keeps_empty_draws(one_process_group, mode):
    """make_private of a DDP module with Poisson sampling yields every draw, empty ones included, and a step on an
    empty draw runs (noise only)."""
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    data = TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
    dp_model, optimizer, criterion, loader = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=1),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=True,
    )
    assert isinstance(loader.batch_sampler, RankShareSampler)
    batches = list(loader)
    assert len(batches) == len(loader) == 40
    assert any(len(x) == 0 for x, _ in batches), "q = 1/40 over 40 examples draws empty batches"
    x, y = next((x, y) for x, y in batches if len(x) == 0)
    before = [p.detach().clone() for p in model.parameters()]
    criterion(dp_model(x), y).backward()
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), "noise was added"
