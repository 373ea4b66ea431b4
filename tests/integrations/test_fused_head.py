"""Hugging Face causal LMs on the fused head (flashnorm/integrations/fused_head.py): per-sample losses and gradients
equal those of the model's own logits (labels shifted inside, -100 ignored), and a DP step equals the float64 oracle
(each sample's gradient through the unfused model, ordinary autograd), tied and untied, HF checkpointing included;
so do those of the unfused path that calls below ``min_fused_tokens`` label positions take."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashnorm.integrations.fused_head import FusedHeadCausalLM, fused_causal_lm, fused_head_unsupported  # noqa: E402
from tests.conftest import CLIPPING_MODES, TOLERANCES  # noqa: E402
from tests.layers.head import dp_step, per_sample_cross_entropy  # noqa: E402
from tests.oracle import microbatch_reference  # noqa: E402

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda tied: transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied),
    "qwen2": lambda tied: transformers.Qwen2Config(**SMALL, tie_word_embeddings=tied),
    "mistral": lambda tied: transformers.MistralConfig(**SMALL, tie_word_embeddings=tied),
    "gemma": lambda tied: transformers.GemmaConfig(**SMALL, head_dim=8, tie_word_embeddings=tied),
    "gpt2": lambda tied: transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                                 tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0,
                                                 attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
}


def build(kind: str, tied: bool):
    torch.manual_seed(0)
    config = CONFIGS[kind](tied)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    return model


def rows(batch=3, steps=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, steps), generator=gen)
    labels = ids.clone()
    labels[1, :5] = -100
    labels[2, 9:] = -100
    return ids, labels


def hf_losses(model, ids, labels, **options):
    """ℓ [B] from the model's own logits (transformers' shift: logits[t] against labels[t + 1])."""
    return per_sample_cross_entropy(model(input_ids=ids).logits, labels, shift=True, **options)


#: min_fused_tokens for each path of a call on ``rows()`` (3 × 13 label positions).
PATHS = {"fused": 0, "unfused": 3 * 13 + 1}


class HeadCalls:
    """Counts the calls of the model's own ``lm_head`` module (the unfused path's, never the fused one's)."""

    def __init__(self, model):
        self.count = 0
        model.get_output_embeddings().register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_losses_and_gradients_equal_the_models_own(kind, tied, path):
    model = build(kind, tied)
    ids, labels = rows()
    fused = fused_causal_lm(model, label_smoothing=0.1, min_fused_tokens=PATHS[path])
    calls = HeadCalls(model)
    upstream = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    loss = fused(input_ids=ids, labels=labels)
    assert (calls.count > 0) == (path == "unfused")
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((loss * upstream).sum(), params)
    want_loss = hf_losses(model, ids, labels, label_smoothing=0.1)
    want = torch.autograd.grad((want_loss * upstream).sum(), params)
    rtol, atol = TOLERANCES["fp64"]
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=atol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _oracle(model, ids, labels, clip, token_reduction):
    return microbatch_reference(
        model, ids, labels,
        lambda logits, y: per_sample_cross_entropy(logits, y, shift=True, token_reduction=token_reduction).sum(),
        clip, forward=lambda m, x: m(input_ids=x).logits,
    )


STEP_CASES = [(mode, "gpt2", True) for mode in CLIPPING_MODES] + [("flash_fuse", "llama", False)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "hf_checkpointing"])
@pytest.mark.parametrize("mode,kind,tied", STEP_CASES)
def test_dp_step_matches_float64(mode, kind, tied, checkpointing, path):
    """One DP step of the fused model (loss_reduction ``mean``, per-sample token mean) equals the float64 oracle on
    the model's own logits, on either path. (Llama's rotary embedding and Gemma's RMSNorm compute in float32 inside a
    float64 model; the two-pass modes on Llama, and every mode on Gemma, then differ from the oracle by ~1e-7
    relative with the unfused head just as with this one, so those cases are left to the exact losses and gradients
    above.)"""
    model = build(kind, tied)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = rows()
    clip = 1e-2
    expected = _oracle(copy.deepcopy(model), ids, labels, clip, "mean")
    wrapper = FusedHeadCausalLM(model, min_fused_tokens=PATHS[path])
    calls = HeadCalls(model)
    dp_model, grads = dp_step(_IdsAndLabels(wrapper), mode, ids, labels, clip, "mean")
    assert (calls.count > 0) == (path == "unfused")
    rtol, atol = TOLERANCES["fp64"]
    torch.testing.assert_close(dp_model.get_norm_sample(), expected.norms, rtol=rtol, atol=atol)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected.clipped_sum[name] / ids.shape[0], rtol=rtol, atol=atol)


class _IdsAndLabels(torch.nn.Module):
    """(ids, labels) positional → the wrapper's keywords (the test loader yields tuples)."""

    def __init__(self, wrapper):
        super().__init__()
        self.wrapper = wrapper

    def forward(self, ids, labels):
        return self.wrapper(input_ids=ids, labels=labels)


def test_refuses_transformed_logits():
    """Gemma-2 soft-caps its logits after lm_head, BERT's causal LM transforms the hidden states before it (dense,
    GELU, LayerNorm: cls.predictions.transform): not a linear cross-entropy of the base model's hidden states,
    refused with the reason."""
    config = transformers.Gemma2Config(**SMALL, head_dim=8)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert "final_logit_softcapping" in fused_head_unsupported(model)
    with pytest.raises(ValueError, match="cannot take the fused head"):
        FusedHeadCausalLM(model)
    bert = transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        is_decoder=True))
    assert type(bert.get_output_embeddings()) is torch.nn.Linear
    assert "outside its base model and lm_head (cls.predictions.transform." in fused_head_unsupported(bert)
    assert all(fused_head_unsupported(build(kind, tied)) is None for kind in CONFIGS for tied in (True, False))


def test_labels_are_required_and_the_threshold_is_not_negative():
    with pytest.raises(ValueError, match="needs labels"):
        fused_causal_lm(build("gpt2", True))(input_ids=rows()[0])
    with pytest.raises(ValueError, match="min_fused_tokens=-1"):
        fused_causal_lm(build("gpt2", True), min_fused_tokens=-1)
