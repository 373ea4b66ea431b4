"""DPTrainer against a float64 per-sample reference, Opacus's accountant, and export without prefixes."""

import copy

import pytest
import torch

from tests.conftest import TOLERANCES

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from flashnorm.integrations.transformers import DPTrainer, PrivacyArguments  # noqa: E402
from flashnorm.utils.export import unwrap_model  # noqa: E402

VOCAB, T = 64, 9


def tiny_gpt2(tied=False):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=tied,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def tiny_bert(num_labels=3):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


class Rows(torch.utils.data.Dataset):
    """Dict samples, as a tokenised dataset gives them."""

    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def lm_rows(n):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    labels = ids.clone()
    labels[0, 3:] = -100  # a sample with few scored positions: its mean is over those alone
    labels[1, :5] = -100
    mask = torch.ones(n, T, dtype=torch.long)
    return Rows(input_ids=ids, attention_mask=mask, labels=labels)


#: transformers' problem types (inferred from num_labels and the labels' dtype) -> (num_labels, labels of n samples)
PROBLEMS = {
    "single_label_classification": (3, lambda n, g: torch.arange(n) % 3),
    "regression": (1, lambda n, g: torch.randn(n, generator=g)),
    "multi_label_classification": (3, lambda n, g: (torch.rand(n, 3, generator=g) > 0.5).float()),
}


def cls_rows(n, problem="single_label_classification"):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, 6:] = 0  # a padded sample
    return Rows(input_ids=ids, attention_mask=mask, labels=PROBLEMS[problem][1](n, g))


def reference_grad(model, rows, clip):
    """Float64, one sample at a time, the model's own ``outputs.loss``: (Σ_b c_b ∇ℓ_b) / B, and the norms."""
    ref = copy.deepcopy(model).double()
    params = dict(ref.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(len(rows)):
        # float labels (regression, multi-label) in float64 too: some transformers releases do not promote them
        sample = {k: (v.double() if v.is_floating_point() else v).unsqueeze(0) for k, v in rows[i].items()}
        loss = ref(**sample).loss
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        for n, g in zip(params, grads):
            total[n] += torch.clamp(clip / (norm + 1e-6), max=1.0) * g
        norms.append(norm)
    return {n: g / len(rows) for n, g in total.items()}, torch.stack(norms)


class FirstStep(transformers.TrainerCallback):
    """The gradient the first optimizer step applied (noised and divided; read before zero_grad)."""

    def __init__(self):
        self.grads = None

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def make_trainer(model, rows, tmp_path, privacy_args, trainer_cls=DPTrainer, callbacks=(), **args):
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    defaults.update(args)
    return trainer_cls(
        model=model, args=transformers.TrainingArguments(**defaults), train_dataset=rows,
        data_collator=transformers.default_data_collator, privacy_args=privacy_args, callbacks=list(callbacks),
    )


def first_step(model, rows, tmp_path, clip, mode="flash_fuse", **args):
    """Trains one DP step with noise 0 and no Poisson sampling: the trainer, the applied gradient, the model before."""
    before = copy.deepcopy(model)
    capture = FirstStep()
    trainer = make_trainer(
        model, rows, tmp_path, PrivacyArguments(noise_multiplier=0.0, per_sample_max_grad_norm=clip, poisson_sampling=False,
                                                grad_sample_mode=mode),
        callbacks=[capture], **args,
    )
    trainer.train()
    return trainer, capture.grads, before


def assert_matches(model, grads, before, reference, lr=1.0, tolerance="fp32"):
    rtol, atol = TOLERANCES[tolerance]
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name].double(), ref, rtol=rtol, atol=atol, msg=name)
        p = model.get_parameter(name)
        torch.testing.assert_close(p, before.get_parameter(name) - lr * grads[name], msg=name)  # the SGD step


@pytest.mark.parametrize(
    "per_device, accumulation, mode, tied",
    [
        (4, 1, "flash_fuse", False),
        (2, 2, "flash_fuse", False),
        (1, 4, "ghost", False),
        (2, 2, "flash_fuse", True),  # GPT-2 as it comes: the LM head tied to the token embedding
        (4, 1, "flash", True),
    ],
)
def test_causal_lm_step_is_the_clipped_mean_over_the_logical_batch(tmp_path, per_device, accumulation, mode, tied):
    rows = lm_rows(4)  # the whole training set is the one logical batch
    model = tiny_gpt2(tied)
    _, norms = reference_grad(model, rows, 1.0)
    clip = float(norms.median())  # some samples clipped, some not
    reference, _ = reference_grad(model, rows, clip)
    assert (norms > clip).any() and (norms < clip).any()
    trainer, grads, before = first_step(
        model, rows, tmp_path, clip, mode, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
    )
    assert trainer.logical_batch_size == 4
    assert_matches(model, grads, before, reference)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_sequence_classification_step_is_the_clipped_mean(tmp_path, problem):
    rows = cls_rows(4, problem)
    model = tiny_bert(PROBLEMS[problem][0])
    _, norms = reference_grad(model, rows, 1.0)
    clip = float(norms.median())
    reference, _ = reference_grad(model, rows, clip)
    assert (norms > clip).any() and (norms < clip).any()
    _, grads, before = first_step(model, rows, tmp_path, clip, gradient_accumulation_steps=2)
    assert_matches(model, grads, before, reference)


class SizeRecorder(DPTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.sizes = getattr(self, "sizes", []) + [inputs["input_ids"].shape[0]]
        return super().training_step(model, inputs, num_items_in_batch)


def opacus_epsilon(mechanism, sigma, q, steps, delta):
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism)
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_is_opacus_accountant_of_the_history_and_is_logged(tmp_path, accountant):
    rows = lm_rows(12)  # L = 1, q = 1/12: Poisson draws empty batches
    trainer = make_trainer(
        tiny_gpt2(), rows, tmp_path, PrivacyArguments(noise_multiplier=0.8, per_sample_max_grad_norm=1.0, accountant=accountant),
        trainer_cls=SizeRecorder, per_device_train_batch_size=1, max_steps=6,
    )
    trainer.train()
    assert 0 in trainer.sizes and len(trainer.sizes) == 6
    assert trainer.sample_rate == 1 / 12
    assert trainer.privacy_engine.accountant.history == [(0.8, 1 / 12, 6)]
    assert trainer.get_epsilon(1e-5) == opacus_epsilon(accountant, 0.8, 1 / 12, 6, 1e-5)
    logged = [entry["epsilon"] for entry in trainer.state.log_history if "epsilon" in entry]
    assert len(logged) == 7 and logged[-1] == trainer.get_epsilon()  # every step, and the final summary
    assert all("grad_norm" not in entry for entry in trainer.state.log_history)


def test_accumulated_micro_batches_are_one_dp_step_of_the_logical_rate(tmp_path):
    rows = lm_rows(24)  # L = 2 × 1, q = 1/12: empty micro-batches and empty logical batches
    trainer = make_trainer(
        tiny_gpt2(), rows, tmp_path, PrivacyArguments(noise_multiplier=0.8, per_sample_max_grad_norm=1.0),
        trainer_cls=SizeRecorder, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=6,
    )
    trainer.train()
    assert 0 in trainer.sizes and len(trainer.sizes) == 12
    assert trainer.privacy_engine.accountant.history == [(0.8, 1 / 12, 6)]


def test_target_epsilon_is_reached_at_the_last_step(tmp_path):
    rows = lm_rows(16)
    trainer = make_trainer(
        tiny_gpt2(), rows, tmp_path, PrivacyArguments(target_epsilon=4.0, target_delta=1e-3, accountant="rdp"),
        per_device_train_batch_size=4, max_steps=3, logging_steps=10,
    )
    trainer.train()
    assert trainer.privacy_engine.accountant.history == [(trainer.noise_multiplier, 1 / 4, 3)]
    assert 4.0 - 0.01 <= trainer.get_epsilon() <= 4.0  # Opacus's get_noise_multiplier tolerance


def test_save_model_and_save_pretrained_write_the_plain_model(tmp_path):
    from safetensors.torch import load_file

    model = tiny_gpt2()
    trainer = make_trainer(model, lm_rows(8), tmp_path / "run", PrivacyArguments(noise_multiplier=1.0), max_steps=2)
    trainer.eval_dataset = lm_rows(4)
    before = trainer.evaluate()["eval_loss"]  # leaves the model in eval mode: train() must still wrap it
    trainer.train()
    assert trainer.evaluate()["eval_loss"] != before
    assert unwrap_model(trainer.dp_model) is model
    for path, save in [
        (tmp_path / "saved", trainer.save_model),
        (tmp_path / "pretrained", unwrap_model(trainer.model_wrapped).save_pretrained),
    ]:
        save(str(path))
        keys = set(load_file(str(path / "model.safetensors")))
        assert keys == set(model.state_dict()) - {n for n, b in model.named_buffers() if n not in keys}
        assert not any(k.startswith(("_module.", "module.")) for k in keys)
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(path))
        for name, p in model.named_parameters():
            torch.testing.assert_close(reloaded.get_parameter(name), p, rtol=0, atol=0, msg=name)


def test_privacy_arguments_refuse_ambiguous_settings():
    with pytest.raises(ValueError, match="exactly one"):
        PrivacyArguments()
    with pytest.raises(ValueError, match="flash_fuse"):
        PrivacyArguments(noise_multiplier=1.0, grad_sample_mode="hooks")


def test_resuming_from_a_checkpoint_goes_on_with_the_accountant(tmp_path):
    privacy = PrivacyArguments(noise_multiplier=1.0, accountant="rdp")
    first = make_trainer(tiny_gpt2(), lm_rows(8), tmp_path, privacy, max_steps=3, save_strategy="steps", save_steps=2)
    first.train()
    resumed = make_trainer(tiny_gpt2(), lm_rows(8), tmp_path, privacy, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 3
    assert resumed.privacy_engine.accountant.history == first.privacy_engine.accountant.history == [(1.0, 0.25, 3)]
    assert resumed.get_epsilon() == first.get_epsilon()
    (tmp_path / "checkpoint-2" / "privacy_accountant.pt").unlink()
    with pytest.raises(FileNotFoundError, match="privacy accounting"):
        make_trainer(tiny_gpt2(), lm_rows(8), tmp_path, privacy, max_steps=3).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
