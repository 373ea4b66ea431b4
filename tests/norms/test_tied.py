"""Cross terms of a parameter used by two layers (flashnorm/norms/tied.py) against the float64 truth: a tied
embedding and LM head (the gather form, ``padding_idx`` included, in either order), two Linear layers sharing a
weight (the per-sample form), and the per-sample dot product they reduce to; in float32 each within its own rounding
bound (`CrossTerm.error`)."""

import pytest
import torch
import torch.nn as nn

from flashnorm.norms import get_norm_rule
from flashnorm.norms.tied import CrossTerm, cross_term, per_sample_dot
from tests.norms.truth import input_and_output_grad, per_sample_truth, tolerance_of

VOCAB, DIM = 11, 5
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def assert_cross_term(cross: CrossTerm, param, first, second, dtype):
    """``cross.value`` [B] against ⟨∇_θ^A ℓ_b, ∇_θ^B ℓ_b⟩ from the float64 per-sample gradients of each use (layer,
    x, g), within atol + rtol·‖∇_θ^A ℓ_b‖‖∇_θ^B ℓ_b‖ (the scale of its terms: a dot product may cancel far below it);
    below float64, within ``cross.error`` too (the bound the clipping coefficient's allowance takes in)."""
    grads = [per_sample_truth(layer, x, g)[param].flatten(1) for layer, x, g in (first, second)]
    truth = (grads[0] * grads[1]).sum(dim=1)
    out = cross.value
    assert cross.error.shape == out.shape and (cross.error >= 0).all(), cross.error
    if dtype != torch.float64:
        off = (out.double().cpu() - truth.cpu()).abs()
        assert (off <= cross.error.double().cpu()).all(), (off.tolist(), cross.error.tolist())
    rtol, atol = tolerance_of(dtype, out.device)
    assert out.shape == truth.shape and torch.isfinite(out).all(), out
    error = (out.double().cpu() - truth.cpu()).abs()
    bound = atol + rtol * (grads[0].norm(dim=1) * grads[1].norm(dim=1)).cpu()
    assert (error <= bound).all(), f"cross term off by {error.tolist()}, allowed {bound.tolist()}"


@pytest.mark.parametrize("chunk", [None, 4000, 50], ids=["one_chunk", "samples_chunked", "rows_chunked"])
@pytest.mark.parametrize("embedding_first", [True, False], ids=["embedding_head", "head_embedding"])
@pytest.mark.parametrize("padding_idx", [None, 0], ids=["no_padding", "padding_0"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", [1, 9, 40])  # T ≥ 12 repeats an id within a sample
def test_tied_embedding_and_head(steps, dtype, padding_idx, embedding_first, chunk, device, monkeypatch):
    """The embedding's ids [B, T] and output gradient [B, T, d]; the head's input [B, T', d] and output gradient
    [B, T', V] (T' = T + 1: the head need not see the embedding's length). ``chunk``: the largest temporary of the
    gather form (`MAX_CHUNK_ELEMENTS`), so that it takes several samples at once, a sample at a time, or rows of one
    (at T = 40: 4000 elements hold two of the three samples, 50 one row)."""
    if chunk is not None:
        monkeypatch.setattr("flashnorm.kernels.accumulation.MAX_CHUNK_ELEMENTS", chunk)
    dtype = DTYPES[dtype]
    embedding = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx).to(device, dtype)
    head = nn.Linear(DIM, VOCAB, bias=False).to(device, dtype)
    head.weight = embedding.weight
    ids = torch.randint(0, VOCAB, (3, steps), device=device)
    ids[1, : steps // 2 + 1] = 0  # padding rows, when padding_idx = 0
    uses = [(embedding, ids, torch.randn(3, steps, DIM, dtype=dtype, device=device)),
            (head, *input_and_output_grad(head, (3, steps + 1, DIM), dtype, device))]
    if not embedding_first:
        uses.reverse()
    (layer_a, x_a, g_a), (layer_b, x_b, g_b) = uses
    out = cross_term(get_norm_rule(layer_a), layer_a, x_a, g_a, get_norm_rule(layer_b), layer_b, x_b, g_b,
                     embedding.weight)
    assert out.value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_cross_term(out, embedding.weight, *uses, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_linear_layers_sharing_a_weight(dtype, device):
    """A weight shared by two Linear layers of different inputs (their biases their own): the per-sample form."""
    dtype = DTYPES[dtype]
    fc_a, fc_b = nn.Linear(4, 3).to(device, dtype), nn.Linear(4, 3).to(device, dtype)
    fc_b.weight = fc_a.weight
    uses = [(fc_a, *input_and_output_grad(fc_a, (5, 7, 4), dtype, device)),
            (fc_b, *input_and_output_grad(fc_b, (5, 2, 3, 4), dtype, device))]
    rule = get_norm_rule(fc_a)
    out = cross_term(rule, *uses[0], rule, *uses[1], fc_a.weight)
    assert_cross_term(out, fc_a.weight, *uses, dtype)


@pytest.mark.parametrize("dtype,acc", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                       (torch.bfloat16, torch.float32)])
def test_per_sample_dot(dtype, acc):
    a, b = torch.randn(4, 3, 5, dtype=dtype), torch.randn(4, 3, 5, dtype=dtype)
    out = per_sample_dot(a, b)
    assert out.dtype == acc and out.shape == (4,)
    expected = torch.stack([torch.dot(a[i].flatten().double(), b[i].flatten().double()) for i in range(4)])
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
