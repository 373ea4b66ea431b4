"""Poisson sampling for data-parallel training that keeps the ranks in step.

Opacus 1.6's ``DistributedUniformWithReplacementSampler`` skips a draw that is empty on a rank, so ranks can take
different numbers of steps and their collectives (the DP optimizer's all-reduce) fall out of step. Here every rank
draws the same Poisson sample of the whole dataset (each example included independently with probability q, from a
generator seeded alike on every rank) and keeps its share, positions ``rank::world_size`` of the draw: every rank
yields every draw, empty shares included, and the shares are disjoint and make up the draw.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader


class RankShareSampler(UniformWithReplacementSampler):
    """Opacus's Poisson batch sampler over the whole dataset, yielding this rank's share of each draw."""

    def __init__(self, *, num_samples: int, sample_rate: float, generator: torch.Generator, rank: int, world_size: int):
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, generator=generator)
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        for indices in super().__iter__():
            yield indices[self.rank :: self.world_size]


def shared_poisson_loader(data_loader: DataLoader, *, device: torch.device, batch_first: bool = True,
                          rand_on_empty: bool = False) -> DataLoader:
    """``data_loader`` with Poisson sampling at q = 1 / len(data_loader), each rank taking its share of one draw
    shared by all ranks (the generator's seed is rank 0's, broadcast once). Collective: call on every rank."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)
    dist.broadcast(seed, src=0)
    generator = torch.Generator().manual_seed(int(seed.item()))
    poisson = DPDataLoader.from_data_loader(data_loader, generator=generator, batch_first=batch_first,
                                            rand_on_empty=rand_on_empty)
    sampler = RankShareSampler(num_samples=len(poisson.dataset), sample_rate=poisson.sample_rate, generator=generator,
                               rank=dist.get_rank(), world_size=dist.get_world_size())
    return DataLoader(
        poisson.dataset, batch_sampler=sampler, collate_fn=poisson.collate_fn, num_workers=poisson.num_workers,
        pin_memory=poisson.pin_memory, timeout=poisson.timeout, worker_init_fn=poisson.worker_init_fn,
        multiprocessing_context=poisson.multiprocessing_context, generator=generator,
        prefetch_factor=poisson.prefetch_factor, persistent_workers=poisson.persistent_workers,
    )
