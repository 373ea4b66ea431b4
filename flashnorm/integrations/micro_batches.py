"""How `flashnorm.integrations.transformers.DPTrainer` cuts a logical DP batch into the Trainer's micro-batches,
on every rank, empty ones included."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


class MicroBatchSampler(Sampler):
    """Cuts this rank's share of each logical batch of ``logical`` (a batch sampler, the same on every rank)
    into ``parts`` consecutive micro-batches; the share of rank r of W is ``indices[r::W]``.

    ``logical`` is assigned after ``make_private`` (Opacus's Poisson sampler replaces the plain one);
    both have the same length, so the Trainer's step count, taken before, stays right. Every rank yields
    ``len(logical) × parts`` micro-batches (empty ones included), so the ranks step together.
    """

    def __init__(self, logical: Sampler, parts: int, rank: int = 0, world_size: int = 1):
        self.logical, self.parts, self.rank, self.world_size = logical, parts, rank, world_size

    def __iter__(self):
        for indices in self.logical:
            share = np.asarray(list(indices), dtype=np.int64)[self.rank :: self.world_size]
            for part in np.array_split(share, self.parts):
                yield part.tolist()

    def __len__(self) -> int:
        return len(self.logical) * self.parts


class CollateOrEmpty:
    """The data collator; an empty micro-batch becomes the collated first sample cut to 0 rows."""

    def __init__(self, collate, dataset):
        self.collate, self.dataset = collate, dataset

    def __call__(self, features):
        if features:
            return self.collate(features)
        return {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in self.collate([self.dataset[0]]).items()}
