"""A real model: transformers' GPT-2 (Conv1D, LayerNorm, token and shared position embeddings), token-level loss."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from tests.conftest import CLIPPING_MODES, TOLERANCES
from tests.oracle import microbatch_reference
from tests.zoo import HFLogits

transformers = pytest.importorskip("transformers")

VOCAB, STEPS, BATCH = 37, 23, 3


def tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double()


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_hf_gpt2_matches_float64_microbatch(mode):
    model = HFLogits(tiny_gpt2())
    ids, targets = torch.randint(0, VOCAB, (BATCH, STEPS)), torch.randint(0, VOCAB, (BATCH, STEPS))
    clip = 0.05

    def sample_loss(logits, target):
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), reduction="mean")

    oracle = microbatch_reference(model, ids, targets, sample_loss, clip)
    engine = FlashNormPrivacyEngine()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp_model, dp_opt, criterion, _ = engine.make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(ids, targets), batch_size=BATCH), noise_multiplier=0.0,
        max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode,
    )
    logits = dp_model(ids)
    criterion(logits.reshape(-1, VOCAB), targets.reshape(-1), shape=(BATCH, STEPS, VOCAB)).backward()
    rtol, atol = TOLERANCES["fp64"]
    torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=rtol, atol=atol)
    assert (oracle.norms > clip).all()
    dp_opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle.clipped_sum[name] / BATCH, rtol=rtol, atol=atol, msg=name)
