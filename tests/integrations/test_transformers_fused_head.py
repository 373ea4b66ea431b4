"""DPTrainer with ``PrivacyArguments.fused_head``: a causal LM's loss on the fused head (`FusedHeadCausalLM`, built
on the same Parameters) trains exactly the float64 per-sample oracle's clipped mean (tied GPT-2, Llama, ragged
sequences with ignored labels, label smoothing, gradient checkpointing and accumulation, micro-batches on either
path of ``min_fused_tokens``); the HF model stays the one saved and checkpointed; ``"auto"`` keeps the model's own
logits on CPU, below its threshold and for an overridden ``dp_loss``; unsupported models are refused, naming why.
(PEFT LoRA: tests/integrations/test_transformers_peft.py; DDP: test_transformers_ddp.py; the argument's parsing:
test_transformers_args.py.)"""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import flashnorm.integrations.transformers as dp_transformers  # noqa: E402
from flashnorm.integrations.fused_head import FusedHeadCausalLM  # noqa: E402
from flashnorm.integrations.privacy_arguments import AUTO_MIN_FUSED_TOKENS  # noqa: E402
from flashnorm.integrations.transformers import DPTrainer, PrivacyArguments  # noqa: E402
from flashnorm.utils.export import unwrap_model  # noqa: E402
from tests.integrations.test_transformers import (  # noqa: E402
    VOCAB, T, FirstStep, Rows, assert_matches, lm_rows, make_trainer, tiny_bert, tiny_gpt2, tiny_llama,
)
from tests.conftest import TOLERANCES  # noqa: E402
from tests.layers.head import per_sample_cross_entropy  # noqa: E402
from tests.oracle import microbatch_reference  # noqa: E402

MODELS = {"gpt2-tied": lambda: tiny_gpt2(tied=True), "llama": tiny_llama}
#: Llama's float64 forward still rounds through float32 (RMSNorm, rotary embedding): a batched and a one-sample
#: forward may differ by a float32 ulp, so its steps are compared at the fp32 tolerance.
TOLERANCE = {"gpt2-tied": "fp64", "llama": "fp32"}


def ragged_rows(n):
    """Sequences of T = 9 or fewer tokens (lengths 9, 5, 7, 4, 8, ...), padded on the right (attention mask 0,
    label -100), sample 1 with its first two labels ignored too."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    lengths = torch.tensor([T, 5, 7, 4, 8, 3, 6])[:n]
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :2] = -100
    return Rows(input_ids=ids, attention_mask=mask, labels=labels)


def oracle(model, rows, clip, label_smoothing=0.0):
    """tests.oracle's float64 microbatch loop on the model's own logits (the shifted token cross-entropy, with
    LabelSmoother's ε, averaged over each sample's scored positions; transformers' own loss would round the logits
    to float32): ({name: Σ_b c_b ∇ℓ_b / B}, the norms [B])."""
    x = torch.stack([rows.columns["input_ids"], rows.columns["attention_mask"]], dim=1)
    step = microbatch_reference(
        model, x, rows.columns["labels"],
        lambda logits, y: per_sample_cross_entropy(logits, y, shift=True, label_smoothing=label_smoothing).sum(),
        clip, forward=lambda m, xb: m(input_ids=xb[:, 0], attention_mask=xb[:, 1]).logits,
    )
    return {n: g / len(rows) for n, g in step.clipped_sum.items()}, step.norms


def privacy(clip, mode="flash_fuse", **kwargs):
    return PrivacyArguments(noise_multiplier=0.0, per_sample_max_grad_norm=clip, poisson_sampling=False,
                            grad_sample_mode=mode, **kwargs)


class HeadCalls:
    """The calls of the model's ``lm_head`` module (the unfused path's) and of the fused head: {(path, label
    positions B·T)}."""

    def __init__(self, model, fused=None):
        self.seen = set()
        model.get_output_embeddings().register_forward_pre_hook(
            lambda _, args: self.seen.add(("unfused", args[0].shape[:-1].numel())))
        if fused is not None:
            fused.head.register_forward_pre_hook(lambda _, args: self.seen.add(("fused", args[1].numel())))


def fused_step(model, rows, tmp_path, privacy_args, trainer_cls=DPTrainer, **args):
    """One DP step (noise 0, no Poisson sampling, one logical batch of all ``rows``): the trainer, the applied
    gradient, the model before it."""
    accumulation = args.setdefault("gradient_accumulation_steps", 1)
    args.setdefault("per_device_train_batch_size", math.ceil(len(rows) / accumulation))
    before = copy.deepcopy(model)
    capture = FirstStep()
    trainer = make_trainer(model, rows, tmp_path, privacy_args, trainer_cls=trainer_cls, callbacks=[capture], **args)
    trainer.train()
    return trainer, capture.grads, before


def tied_llama(vocab, positions):
    """A two-layer Llama with tied embeddings (Llama-3.2's head), float32."""
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def padded_rows(n, steps, vocab):
    """n rows of ``steps`` tokens, the second padded from 3/4 on (attention mask 0, labels -100)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (n, steps), generator=g)
    mask = torch.ones(n, steps, dtype=torch.long)
    if n > 1:
        mask[1, 3 * steps // 4:] = 0
    return Rows(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def median_clip(model, rows):
    """A C that clips some samples and not others."""
    _, norms = oracle(model, rows, 1.0)
    clip = float(norms.median())
    assert (norms > clip).any() and (norms < clip).any()
    return clip


@pytest.mark.parametrize("name,mode,per_device,accumulation,checkpointing", [
    ("gpt2-tied", "flash_fuse", 2, 2, False),
    ("gpt2-tied", "ghost", 4, 1, True),
    ("llama", "flash_fuse", 2, 2, True),
    ("llama", "flash", 4, 1, False),
])
def test_fused_step_is_the_float64_oracle(tmp_path, name, mode, per_device, accumulation, checkpointing):
    """fused_head="on": make_private takes a FusedHeadCausalLM around the very model (lm_head never called), and
    the step is the oracle's clipped mean over ragged sequences with ignored labels, with gradient accumulation and
    HF gradient checkpointing (non-reentrant)."""
    model = MODELS[name]().double()
    rows = ragged_rows(4)
    clip = median_clip(model, rows)
    reference, _ = oracle(model, rows, clip)
    calls = HeadCalls(model)
    checkpointing_args = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer, grads, before = fused_step(
        model, rows, tmp_path, privacy(clip, mode, fused_head="on"), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, **(checkpointing_args if checkpointing else {}))
    assert isinstance(trainer.fused_model, FusedHeadCausalLM) and trainer.fused_model.model is model
    assert unwrap_model(trainer.dp_model) is trainer.fused_model and trainer.model is model
    assert trainer.fused_model.min_fused_tokens == 0 and not calls.seen
    assert model.is_gradient_checkpointing == checkpointing
    assert_matches(model, grads, before, reference, tolerance=TOLERANCE[name])


@pytest.mark.parametrize("fused_head", ["on", "off"])
def test_float32_tied_step_at_256_positions_is_the_oracles(tmp_path, fused_head):
    """A float32 tied Llama at T = 256 (two rows, one padded), clipping one sample of the two: the coefficient is
    Opacus's, so the step is the float64 oracle's at the fp32 tolerance, fused head or the model's own logits. The tied
    cross term's rounding bound (flashnorm/norms/tied.py) stays within the allowance; a bound of T·T' products times
    s_A·s_B lowered both coefficients by 1.6 % here (a relative error of 1.4 % in the step)."""
    rows = padded_rows(2, 256, 1000)
    _, norms = oracle(tied_llama(1000, 256).double(), rows, 1.0)
    clip = float(norms.mean())
    reference, _ = oracle(tied_llama(1000, 256).double(), rows, clip)
    model = tied_llama(1000, 256)
    _, grads, before = fused_step(model, rows, tmp_path, privacy(clip, fused_head=fused_head))
    assert_matches(model, grads, before, reference, tolerance="fp32")


EPS = 0.3


def test_label_smoothing_is_the_fused_heads(tmp_path):
    """The Trainer's label_smoothing_factor ε is the fused head's: the step is the clipped mean of the per-sequence
    LabelSmoother losses."""
    model = tiny_gpt2(tied=True).double()
    rows = ragged_rows(4)
    clip = median_clip(model, rows)
    reference, _ = oracle(model, rows, clip, label_smoothing=EPS)
    trainer, grads, before = fused_step(model, rows, tmp_path, privacy(clip, fused_head="on"),
                                        label_smoothing_factor=EPS, gradient_accumulation_steps=2)
    assert trainer.fused_model.head.label_smoothing == EPS
    assert_matches(model, grads, before, reference, tolerance="fp64")


class Threshold(DPTrainer):
    """Sets the fused model's ``min_fused_tokens`` (``fused_head="on"`` gives 0)."""

    min_fused_tokens = 0

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        self.fused_model.min_fused_tokens = self.min_fused_tokens
        self.calls = HeadCalls(self.model, self.fused_model)
        return optimizer


#: A logical batch of 5 ragged rows in 2 micro-batches, of 3 and 2 rows (27 and 18 label positions): min_fused_tokens
#: 0 fuses both, 20 the first, 28 neither.
@pytest.mark.parametrize("min_fused_tokens,paths", [(0, ("fused", "fused")), (20, ("fused", "unfused")),
                                                    (28, ("unfused", "unfused"))])
def test_either_path_of_min_fused_tokens_is_the_float64_oracle(tmp_path, min_fused_tokens, paths):
    model = tiny_gpt2(tied=True).double()
    rows = ragged_rows(5)
    clip = median_clip(model, rows)
    reference, _ = oracle(model, rows, clip)
    trainer_cls = type("Threshold", (Threshold,), {"min_fused_tokens": min_fused_tokens})
    trainer, grads, before = fused_step(model, rows, tmp_path, privacy(clip, fused_head="on"), trainer_cls=trainer_cls,
                                        per_device_train_batch_size=3, gradient_accumulation_steps=2)
    assert trainer.calls.seen == {(paths[0], 27), (paths[1], 18)}
    assert_matches(model, grads, before, reference, tolerance="fp64")


class EveryStep(transformers.TrainerCallback):
    """The gradient each optimizer step applied, and whether the DP model's forward hooks were parked (its
    one-sample path) in that step."""

    def __init__(self):
        self.grads, self.parked = [], []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        self.parked.append(self.trainer.dp_model.hooks.parked)


@pytest.mark.parametrize("name,path,accumulation,checkpointing,parked", [
    ("gpt2-tied", "fused", 1, False, [False, True, True]),
    ("llama", "fused", 1, True, [False, True, True]),
    ("gpt2-tied", "fused", 2, True, [True, True, True]),
    ("gpt2-tied", "unfused", 1, False, [False, True, True]),
])
def test_one_sample_micro_batches_take_the_one_sample_path(tmp_path, name, path, accumulation, checkpointing, parked):
    """per_device_train_batch_size=1 (long context's setting): the trainer calls model(**batch), and from the
    second micro-batch on the step takes the one-sample path (hooks parked, one ordinary backward through the fused
    head, the whole gradient clipped, summed with the earlier micro-batches' under accumulation), each optimizer
    step the float64 oracle's (the same row every micro-batch, lr 0); with HF gradient checkpointing too, and on
    the unfused path of min_fused_tokens (the model's own lm_head)."""
    model = MODELS[name]().double()
    one = Rows(**{k: v[1:2] for k, v in ragged_rows(2).columns.items()})  # padded, labels ignored in part
    rows = Rows(**{k: v.expand(3 * accumulation, -1).clone() for k, v in one.columns.items()})
    _, norms = oracle(model, one, 1.0)
    clip = float(norms[0]) / 2  # clipped: c = 1/2
    reference, _ = oracle(model, one, clip)
    steps = EveryStep()
    trainer_cls = type("Threshold", (Threshold,), {"min_fused_tokens": 0 if path == "fused" else 10**6})
    trainer = make_trainer(model, rows, tmp_path, privacy(clip, fused_head="on"), trainer_cls=trainer_cls,
                           callbacks=[steps], per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
                           max_steps=3,
                           learning_rate=0.0, gradient_checkpointing=checkpointing,
                           gradient_checkpointing_kwargs={"use_reentrant": False})
    steps.trainer = trainer
    trainer.train()
    assert steps.parked == parked and trainer.calls.seen == {(path, T)}
    for grads in steps.grads:
        for n, ref in reference.items():
            rtol, atol = TOLERANCES[TOLERANCE[name]]
            torch.testing.assert_close(grads[n].double(), ref, rtol=rtol, atol=atol, msg=n)


def test_auto_is_the_models_own_logits_on_cpu(tmp_path):
    """On CPU, "auto" (the default) and "off" make the model itself private."""
    assert PrivacyArguments(noise_multiplier=1.0).fused_head == "auto"
    for setting in ("auto", "off"):
        model = tiny_gpt2(tied=True)
        trainer = make_trainer(model, lm_rows(4), tmp_path / setting,
                               PrivacyArguments(noise_multiplier=1.0, fused_head=setting))
        trainer.train()
        assert trainer.fused_model is None and unwrap_model(trainer.dp_model) is model


def test_auto_fuses_long_micro_batches_on_cuda_only():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert dp_transformers._min_fused_tokens("auto", cuda) == AUTO_MIN_FUSED_TOKENS == 16384
    assert dp_transformers._min_fused_tokens("auto", cpu) is None
    assert dp_transformers._min_fused_tokens("on", cpu) == dp_transformers._min_fused_tokens("on", cuda) == 0
    assert dp_transformers._min_fused_tokens("off", cuda) is None


class OwnLoss(DPTrainer):
    def dp_loss(self, model, inputs):
        return 2 * super().dp_loss(model, inputs)


def test_auto_as_on_cuda_wraps_unless_dp_loss_is_overridden(tmp_path, monkeypatch):
    """"auto" where it fuses (CUDA, here pretended): the fused model with min_fused_tokens 16384 (this micro-batch,
    of fewer label positions, takes the unfused path); an overridden dp_loss gets the model itself. "on" hands the
    override the fused model, whose ℓ it trains."""
    monkeypatch.setattr(dp_transformers, "_min_fused_tokens",
                        lambda setting, device: {"auto": AUTO_MIN_FUSED_TOKENS, "on": 0}.get(setting))
    model = tiny_gpt2(tied=True).double()
    rows = ragged_rows(4)
    clip = median_clip(model, rows)
    reference, _ = oracle(model, rows, clip)
    # c_b(2g_b)·2g_b = 2·c_b'(g_b)·g_b with C' = C / 2, up to the 10⁻⁶ in c's denominator (hence fp32 below)
    doubled, _ = oracle(model, rows, clip / 2)
    calls = HeadCalls(model)
    trainer, grads, before = fused_step(model, rows, tmp_path / "auto", privacy(clip))
    assert trainer.fused_model.min_fused_tokens == AUTO_MIN_FUSED_TOKENS and calls.seen == {("unfused", 4 * T)}
    assert_matches(model, grads, before, reference, tolerance="fp64")
    for setting in ("auto", "on"):
        model = tiny_gpt2(tied=True).double()
        trainer, grads, before = fused_step(model, rows, tmp_path / setting, privacy(clip, fused_head=setting),
                                            trainer_cls=OwnLoss)
        assert (trainer.fused_model is None) == (setting == "auto")
        assert_matches(model, grads, before, {n: 2 * g for n, g in doubled.items()})


def test_the_saved_and_resumed_model_is_the_hf_model(tmp_path):
    """fused_head="on": save_model and the checkpoints hold the HF model's own state-dict keys (no wrapper prefix),
    from_pretrained loads the trained weights, and a run resumed from a checkpoint goes on with the accountant."""
    from safetensors.torch import load_file

    model = tiny_gpt2(tied=True)
    settings = PrivacyArguments(noise_multiplier=1.0, accountant="rdp", fused_head="on")
    trainer = make_trainer(model, lm_rows(8), tmp_path / "run", settings, max_steps=2, save_strategy="steps",
                           save_steps=1)
    trainer.train()
    assert trainer.fused_model is not None
    trainer.save_model(str(tmp_path / "saved"))
    model.save_pretrained(str(tmp_path / "plain"))  # the HF model's own keys (the tied lm_head.weight left out)
    keys = set(load_file(str(tmp_path / "plain" / "model.safetensors")))
    assert "transformer.wte.weight" in keys
    for path in (tmp_path / "saved", tmp_path / "run" / "checkpoint-2"):
        assert set(load_file(str(path / "model.safetensors"))) == keys, path
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(path))
        for name, p in model.named_parameters():
            torch.testing.assert_close(reloaded.get_parameter(name), p, rtol=0, atol=0, msg=name)
    resumed = make_trainer(tiny_gpt2(tied=True), lm_rows(8), tmp_path / "run", settings, max_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert resumed.fused_model is not None and resumed.state.global_step == 2
    assert resumed.privacy_engine.accountant.history == trainer.privacy_engine.accountant.history == [(1.0, 0.25, 2)]


def tiny_gemma2():
    """Gemma-2 soft-caps its logits after lm_head."""
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8))


@pytest.mark.parametrize("build,rows,reason", [
    (tiny_gemma2, lambda: lm_rows(4), "Gemma2ForCausalLM cannot take the fused head: .*final_logit_softcapping"),
    (tiny_bert, lambda: Rows(input_ids=lm_rows(4).columns["input_ids"], labels=torch.arange(4) % 3),
     "causal LM's loss, and the model's task is SEQ_CLS"),
], ids=["softcapped-logits", "classifier"])
def test_on_refuses_a_model_it_cannot_take_naming_why(tmp_path, build, rows, reason):
    model = build()
    before = copy.deepcopy(model)
    rows = rows()
    trainer = make_trainer(model, rows, tmp_path, PrivacyArguments(noise_multiplier=1.0, fused_head="on"))
    with pytest.raises(ValueError, match=f"fused_head='on'.*{reason}.*'auto' or 'off'"):
        trainer.train()
    assert trainer.privacy_engine is None  # refused before anything was made private
    for name, p in model.named_parameters():
        assert torch.equal(p, before.get_parameter(name)), name
    trainer = make_trainer(build(), rows, tmp_path / "auto", PrivacyArguments(noise_multiplier=1.0))
    trainer.train()  # "auto" trains it on its own logits
    assert trainer.fused_model is None
