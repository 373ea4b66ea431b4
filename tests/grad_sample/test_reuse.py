"""Parameters used more than once, exact against the float64 per-sample oracle in every mode:
a layer called twice, a module under two names, a weight tied between two layers, Opacus's DP RNNs (an
``RNNLinear`` called once per time step), and activation checkpointing (reentrant and not)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint
from opacus.layers import DPGRU, DPLSTM, DPRNN
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from flashnorm.norms import PerSampleGradFallback
from tests.conftest import CLIPPING_MODES, TOLERANCES
from tests.oracle import microbatch_reference
from tests.zoo import HFLogits

VOCAB, D = 13, 6


def _sum_loss(out, target):
    return nn.functional.cross_entropy(out, target, reduction="sum")


class TwiceCalled(nn.Module):
    """The same Linear on two inputs, and applied twice in a row."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        a = torch.tanh(self.shared(x))
        b = torch.tanh(self.shared(a))  # applied twice
        c = self.shared(x.flip(1))  # on another input
        return self.head((b + c).mean(dim=1))


class TwoNames(nn.Module):
    """One module registered under two names, each name used once."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(D, D)
        self.second = self.first
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.norm(self.second(torch.tanh(self.first(x)))).mean(dim=1))


class TiedLM(nn.Module):
    """Token embedding tied to the output head (GPT-2 / Llama style); the loss reads one position's logits."""

    def __init__(self, padding_idx=None):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D, padding_idx=padding_idx)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.wte(ids)))).mean(dim=1)


class TiedLinears(nn.Module):
    """Two Linear layers sharing one weight (the generic cross term)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        self.b.weight = self.a.weight
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).mean(dim=1))


class RNNHead(nn.Module):
    def __init__(self, rnn_class):
        super().__init__()
        self.rnn = rnn_class(D, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Checkpointed(nn.Module):
    """Two blocks run under torch.utils.checkpoint."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x.mean(dim=1))


def _inputs(kind, batch, steps):
    if kind in ("tied_lm", "tied_lm_padding"):
        return torch.randint(0, VOCAB, (batch, steps))
    return torch.randn(batch, steps, D, dtype=torch.float64)


MODELS = {
    "twice_called": TwiceCalled,
    "two_names": TwoNames,
    "tied_lm": TiedLM,
    "tied_lm_padding": lambda: TiedLM(padding_idx=0),
    "tied_linears": TiedLinears,
    "dp_lstm": lambda: RNNHead(DPLSTM),
    "dp_gru": lambda: RNNHead(DPGRU),
    "dp_rnn": lambda: RNNHead(DPRNN),
    "checkpoint_reentrant": lambda: Checkpointed(True),
    "checkpoint_non_reentrant": lambda: Checkpointed(False),
}


def dp_step(model, x, y, mode, reduction, clip):
    engine = FlashNormPrivacyEngine()
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    dp_model, dp_opt, criterion, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        criterion=nn.CrossEntropyLoss(reduction=reduction), noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode=mode, loss_reduction=reduction,
    )
    criterion(dp_model(x), y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    dp_opt.step()
    return dp_model, grads


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("steps", [1, 7, 37])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_reused_parameters_are_exact(mode, kind, steps, reduction):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    x, y = _inputs(kind, 4, steps), torch.randint(0, 3 if "tied_lm" not in kind else VOCAB, (4,))
    clip = 0.05
    oracle = microbatch_reference(model, x, y, _sum_loss, clip)
    assert (oracle.norms > clip).all(), "every sample is clipped: the norms decide the step"
    dp_model, grads = dp_step(model, x, y, mode, reduction, clip)
    torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hf_gpt2_with_tied_embeddings_is_exact(mode, reduction, attn):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=37, n_positions=32,
                                     tie_word_embeddings=True, attn_implementation=attn, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).double()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 37, (3, 9))
    target = torch.randint(0, 37, (3,))

    class LastToken(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(ids).logits[:, -1]

    wrapped = LastToken(model)
    oracle = microbatch_reference(wrapped, ids, target, _sum_loss, 0.1)
    dp_model, grads = dp_step(wrapped, ids, target, mode, reduction, 0.1)
    torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=1e-9, atol=1e-12)
    for name, p in wrapped.named_parameters():
        torch.testing.assert_close(grads[name], oracle.clipped_sum[name], rtol=1e-9, atol=1e-12)


class _LastToken(nn.Module):
    """An HF language model whose loss reads the last position's logits (one target per sequence)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits[:, -1]


def _hf_model(name):
    transformers = pytest.importorskip("transformers")
    if name.startswith("gpt2"):
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=37, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    elif name == "llama_tied":
        config = transformers.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                          max_position_embeddings=32, attn_implementation="eager")
        model = transformers.LlamaForCausalLM(config)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    elif name == "gemma_tied":
        config = transformers.GemmaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
                                          max_position_embeddings=32, attn_implementation="eager")
        model = transformers.GemmaForCausalLM(config)
        with torch.no_grad():  # (Gemma's norms start at w = 0: random weights make every term show)
            for module in model.modules():
                if type(module).__name__ == "GemmaRMSNorm":
                    module.weight.normal_()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        config = transformers.BertConfig(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=24, max_position_embeddings=32, num_labels=3,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.BertForSequenceClassification(config)
        return HFLogits(model)
    if name.startswith("gpt2_checkpoint"):
        reentrant = name == "gpt2_checkpoint_reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return _LastToken(model)


@pytest.mark.parametrize("name", ["llama_tied", "gemma_tied", "bert", "gpt2_checkpoint_reentrant", "gpt2_checkpoint_non_reentrant"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_hf_models_are_exact(name, mode):
    torch.manual_seed(0)
    model = _hf_model(name).double()
    ids = torch.randint(1, 37, (3, 9))
    target = torch.randint(0, 3, (3,))
    oracle = microbatch_reference(model, ids, target, _sum_loss, 0.1)
    dp_model, grads = dp_step(model, ids, target, mode, "sum", 0.1)
    fallback = [layer.name for layer in dp_model.layers if isinstance(layer.rule, PerSampleGradFallback)]
    assert not fallback, f"layers on the per-sample fallback: {fallback}"  # HF's RMSNorms have the RMSNorm rule
    # Gemma's RMSNorm forms its weight's gradient in float32 whatever the model's dtype (the oracle's too), and
    # LlamaRMSNorm computes x̂ in float32: the second pass of a two-pass mode sends c_b-scaled gradients through
    # those casts, which round them differently from the oracle's unscaled ones.
    rtol, atol = (1e-9, 1e-12) if name != "gemma_tied" else TOLERANCES["fp32"]
    torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=rtol, atol=atol)
    if name in ("llama_tied", "gemma_tied") and mode != "flash_fuse":
        rtol, atol = TOLERANCES["fp32"]
    for name_, p in model.named_parameters():
        torch.testing.assert_close(grads[name_], oracle.clipped_sum[name_], rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["llama_tied", "gemma_tied"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_hf_tied_models_bound_an_adversarial_samples_influence(name, mode):
    """As an attacker would, noise 0: a sample that repeats one token and targets that same token (its tied
    embedding row and head row both carry its gradient, the cross term at its largest) changes the summed clipped
    gradient by at most C, through the RMSNorm, scaled-embedding and tied-head rules."""
    torch.manual_seed(0)
    model = _hf_model(name).double()
    ids = torch.randint(1, 37, (5, 9))
    target = torch.randint(0, 37, (5,))
    ids[-1], target[-1] = 7, 7
    clip = 1e-3

    def summed(x, y):
        _, grads = dp_step(copy.deepcopy(model), x, y, mode, "sum", clip)
        return torch.cat([g.flatten() for g in grads.values()])

    influence = (summed(ids, target) - summed(ids[:-1], target[:-1])).norm()
    assert influence <= clip * (1 + 1e-3), influence


def test_non_reentrant_checkpointing_pins_no_input_in_the_forward():
    """Inside a non-reentrant checkpointed block the forward keeps no layer input (the memory saving stays): X is
    taken when the backward recomputes the block."""
    torch.manual_seed(0)
    model = _hf_model("gpt2_checkpoint_non_reentrant").double()
    ids = torch.randint(1, 37, (3, 9))
    loader = DataLoader(TensorDataset(ids, torch.zeros(3, dtype=torch.long)), batch_size=3)
    dp_model, _, _, _ = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="flash_fuse",
    )
    dp_model(ids)
    in_blocks = [layer for layer in dp_model.layers if ".h." in layer.name]
    outside = [layer for layer in dp_model.layers if ".h." not in layer.name]
    assert in_blocks and all(dp_model.step.inputs_of(layer) == [None] for layer in in_blocks)
    assert all(dp_model.step.inputs_of(layer) and dp_model.step.inputs_of(layer)[0] is not None for layer in outside)


class _CheckpointedBlock(nn.Module):
    """x → Linear → Tanh → Linear (``last``) inside one non-reentrant checkpoint, then a Linear head: the block's
    last Linear saves its input, the last tensor its backward needs, so an early-stopping recompute ends before it
    runs."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(checkpoint.checkpoint(self.block, x, use_reentrant=False))


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_one_sample_recomputes_a_checkpointed_block_only_as_far_as_autograd_needs(mode):
    """A batch of one captures nothing, so its recompute stops where autograd's own does (the block's last Linear is
    not run twice), while a larger batch recomputes the whole block to capture its layers' inputs; both steps are the
    float64 oracle's."""
    torch.manual_seed(0)
    model = _CheckpointedBlock().double()
    reference = copy.deepcopy(model)
    runs = []
    model.block[2].register_forward_hook(lambda module, inputs, output: runs.append(1))
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    clip = 1e-2
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    dp_model, optimizer, criterion, _ = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
        criterion=nn.CrossEntropyLoss(reduction="sum"), noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode=mode, loss_reduction="sum",
    )
    # the first step (two samples; its forward also runs the independence probe) tells the wrapper the batch's
    # layout; the second, of one sample, still captures (recomputing the whole block); the third takes the shortcut
    for rows, calls in ((slice(0, 2), None), (slice(0, 1), 2), (slice(2, 3), 1)):
        runs.clear()
        optimizer.zero_grad()
        criterion(dp_model(x[rows]), y[rows]).backward()
        optimizer.step()
        assert calls is None or len(runs) == calls, (rows, runs)
        oracle = microbatch_reference(reference, x[rows], y[rows], _sum_loss, clip)
        rtol, atol = TOLERANCES["fp64"]
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=rtol, atol=atol)
