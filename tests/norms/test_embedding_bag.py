"""``nn.EmbeddingBag`` (one bag per sample, a 2-D input [B, L]): exact against the float64 oracle in every mode.

Modes ``sum`` (with and without ``per_sample_weights``), ``mean`` and ``max``, with ``padding_idx`` and repeated ids
in a bag (their gradients add in one row). A 1-D input with offsets is refused with a clear error, θ unchanged.
"""

import pytest
import torch
import torch.nn as nn

from flashnorm.norms import get_norm_rule
from flashnorm.norms.embedding import EmbeddingBagRule
from tests.grad_sample.guarantee import MODES, Attempt, influence, make_private, oracle, run, step, without_last

C = 1.0
VOCAB, DIM = 11, 4


class Bags(nn.Module):
    def __init__(self, mode, padding_idx=None, weighted=False):
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, DIM, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(DIM, 3)
        self.weighted = weighted

    def forward(self, batch):
        ids, weights = batch[..., 0].long(), batch[..., 1]
        if self.weighted:
            return self.head(self.bag(ids, per_sample_weights=weights))
        return self.head(self.bag(ids))


def _batch(n=4, steps=5, padding_idx=None):
    """[n, L, 2]: ids (with a repeated id and a padding position) and per-sample weights, float64."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (n, steps), generator=gen)
    ids[:, 1] = ids[:, 0]  # a repeated id in every bag
    if padding_idx is not None:
        ids[0, 2] = padding_idx
        ids[1] = padding_idx  # an empty bag
    weights = torch.randn(n, steps, generator=gen, dtype=torch.float64)
    weights[-1] *= 1e3
    g = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    g[-1] *= 1e3
    return without_last(torch.stack([ids.double(), weights], dim=-1), g)


CASES = {
    "sum": dict(mode="sum"),
    "sum_weighted": dict(mode="sum", weighted=True),
    "sum_padding": dict(mode="sum", padding_idx=0),
    "mean": dict(mode="mean"),
    "mean_padding": dict(mode="mean", padding_idx=0),
    "max": dict(mode="max"),
    "max_padding": dict(mode="max", padding_idx=0),
}


def test_embedding_bag_has_a_rule():
    assert isinstance(get_norm_rule(nn.EmbeddingBag(VOCAB, DIM)), EmbeddingBagRule)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_embedding_bag_is_exact_in_every_mode(mode, case):
    def make(b):
        x, g = b
        torch.manual_seed(0)
        model = Bags(**CASES[case]).double()
        private = make_private(model, mode, clip=C)
        return Attempt(model, lambda: step(private, x, g), expected=oracle(private.model, x, g, C))

    assert influence(make, _batch(padding_idx=CASES[case].get("padding_idx")), C) <= C * (1 + 1e-3)


class FlatBags(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, DIM)

    def forward(self, ids):
        return self.bag(ids.reshape(-1), torch.arange(0, ids.numel(), ids.shape[1]))


@pytest.mark.parametrize("mode", MODES)
def test_a_one_dimensional_input_with_offsets_is_refused(mode):
    torch.manual_seed(0)
    model = FlatBags().double()
    private = make_private(model, mode, clip=C)
    ids = torch.randint(0, VOCAB, (4, 3))
    g = torch.randn(4, DIM, dtype=torch.float64)
    assert run(Attempt(model, lambda: step(private, ids, g)), r"EmbeddingBag.*2-D input \[B, L\]") is None
