"""The ``nn.Embedding`` rule (flashnorm/norms/embedding.py) against the float64 truth: ids repeated within a
sample (their rows summed before the norm), ``padding_idx`` rows without gradient, ids of any rank."""

import pytest
import torch
import torch.nn as nn

from flashnorm.norms import get_norm_rule
from tests.norms.truth import assert_rule_exact

VOCAB, DIM = 11, 5  # T ≥ 12 repeats an id within a sample
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
#: Id shape [B, *middle] by rank, for a sequence length T.
SHAPES = {"1d": lambda t: (), "2d": lambda t: (t,), "3d": lambda t: (2, t)}
RANK_STEPS = [("1d", 1)] + [(rank, t) for rank in ("2d", "3d") for t in (1, 37, 601)]


def layer_and_pair(rank, batch, steps, dtype, device, padding_idx=None):
    layer = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx).to(device, dtype)
    ids = torch.randint(0, VOCAB, (batch, *SHAPES[rank](steps)), device=device)
    return layer, ids, torch.randn(*ids.shape, DIM, dtype=dtype, device=device)


@pytest.mark.parametrize("padding_idx", (None, 0), ids=["no_padding", "padding_0"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank,steps", RANK_STEPS)
def test_rule_matches_float64(rank, steps, dtype, padding_idx, device):
    layer, ids, g = layer_and_pair(rank, 3, steps, DTYPES[dtype], device, padding_idx)
    if steps == 601:
        ids[1] = 0  # a sample of padding alone (no gradient) when padding_idx = 0
    assert_rule_exact(get_norm_rule(layer), layer, ids, g, methods=("exact", "per_sample"))


def test_empty_batch(device):
    layer, ids, g = layer_and_pair("2d", 0, 37, torch.float32, device, padding_idx=0)
    assert_rule_exact(get_norm_rule(layer), layer, ids, g, methods=("exact", "per_sample"))


def test_repeated_ids_sum_before_the_norm(device):
    """Id 3 twice in one sample: its gradient row is g₁ + g₂, so ‖∇‖² = ‖g₁ + g₂‖², not ‖g₁‖² + ‖g₂‖²."""
    layer = nn.Embedding(VOCAB, DIM).to(device, torch.float64)
    ids = torch.tensor([[3, 3]], device=device)
    g = torch.randn(1, 2, DIM, dtype=torch.float64, device=device)
    expected = (g[0, 0] + g[0, 1]).square().sum()
    torch.testing.assert_close(get_norm_rule(layer).norm_sq(layer, ids, g, method="exact"), expected.reshape(1))


@pytest.mark.parametrize("option", ("sparse", "scale_grad_by_freq"))
def test_unsupported_options_fall_back(option):
    layer = nn.Embedding(VOCAB, DIM, **{option: True})
    assert get_norm_rule(layer).supports(layer) == f"{option}=True"
    assert get_norm_rule(nn.Embedding(VOCAB, DIM)).supports(nn.Embedding(VOCAB, DIM)) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", (1, 37, 601))
def test_gemma_scaled_embedding_matches_float64(steps, dtype, device):
    """Gemma's embedding (lookup · embed_scale, a buffer): recognised by its code, exact with its padding row."""
    modeling = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    layer = modeling.GemmaTextScaledWordEmbedding(VOCAB, DIM, padding_idx=0, embed_scale=DIM**0.5).to(device, DTYPES[dtype])
    assert type(get_norm_rule(layer)).__name__ == "ScaledEmbeddingRule"
    ids = torch.randint(0, VOCAB, (3, steps), device=device)
    g = torch.randn(3, steps, DIM, dtype=DTYPES[dtype], device=device)
    assert_rule_exact(get_norm_rule(layer), layer, ids, g, methods=("exact", "per_sample"))
