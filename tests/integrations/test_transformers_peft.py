"""DPTrainer on PEFT models (LoRA, prefix tuning): the task found from PEFT's task_type or the config, each step
exactly the float64 per-sample oracle's clipped sum over the trainable adapter parameters only, a sample's influence
≤ C, the frozen base untouched, the adapter saved the PEFT way, prompt tuning refused naming the layer."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

from flashnorm.integrations.transformers import DPTrainer, PrivacyArguments, model_task  # noqa: E402
from flashnorm.utils.export import unwrap_model  # noqa: E402
from tests.conftest import CLIPPING_MODES, TOLERANCES  # noqa: E402
from tests.grad_sample.guarantee import NEVER, Attempt, influence, run  # noqa: E402
from tests.integrations.test_transformers import VOCAB, T, Rows, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402
from tests.oracle import microbatch_reference  # noqa: E402


def tiny_gpt2_classifier():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2ForSequenceClassification(config)


#: name -> (base model, PEFT config, task). LoRA B starts random (init_lora_weights=False) so that A and B both
#: get gradients; SEQ_CLS makes the classifier head trainable through PEFT's modules_to_save.
MODELS = {
    "gpt2-lora": (tiny_gpt2, lambda: peft.LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                                    fan_in_fan_out=True, init_lora_weights=False), "CAUSAL_LM"),
    "llama-lora": (tiny_llama, lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM", init_lora_weights=False), "CAUSAL_LM"),
    "bert-lora-cls": (tiny_bert, lambda: peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                        init_lora_weights=False), "SEQ_CLS"),
    "gpt2-lora-cls": (tiny_gpt2_classifier, lambda: peft.LoraConfig(
        r=4, target_modules=["c_attn"], task_type="SEQ_CLS", fan_in_fan_out=True, init_lora_weights=False), "SEQ_CLS"),
    "gpt2-prefix": (tiny_gpt2, lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                    "CAUSAL_LM"),
}


#: Models whose float64 forward still rounds through float32 (Llama's RMSNorm normalises in float32; its rotary
#: embedding is computed in float32): the batched and the one-sample forwards may differ by a float32 ulp, so their
#: steps are compared to the oracle at the fp32 tolerance.
ROUNDS_IN_FP32 = {"llama-lora"}


def peft_model(name, dtype=torch.float64):
    build, config, _ = MODELS[name]
    model = peft.get_peft_model(build(), config())
    torch.manual_seed(1)
    with torch.no_grad():  # the prefix embedding starts random too
        for n, p in model.named_parameters():
            if p.requires_grad and "prompt_encoder" in n:
                p.normal_()
    return model.to(dtype)


def rows_for(task, n, seed=3):
    """input_ids, attention_mask (all ones), labels: token ids (causal LM: = input ids, some positions ignored) or
    classes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    if task == "CAUSAL_LM":
        labels = ids.clone()
        labels[0, :4] = -100  # a sample scored on some positions only
    else:
        labels = torch.arange(n) % 3
    return Rows(input_ids=ids, attention_mask=mask, labels=labels)


def with_adversary(name, n):
    """(rows whose last sample is an adversary, the rows without it): of 8 candidate sequences (a token repeated,
    scored against wrong labels; or random ones) the one with the largest gradient under the model."""
    task = MODELS[name][2]
    rows = rows_for(task, n)
    candidates = rows_for(task, 8, seed=5)
    for k in range(4):
        candidates.columns["input_ids"][k] = 7 + k
        candidates.columns["labels"][k] = 11 + k if task == "CAUSAL_LM" else k % 3
    strongest = int(oracle(peft_model(name), candidates, task, 1.0).norms.argmax())
    cols = {k: torch.cat([v[:-1], candidates.columns[k][strongest:strongest + 1]]) for k, v in rows.columns.items()}
    return Rows(**cols), Rows(**{k: v[:-1] for k, v in cols.items()})


def sample_loss(task):
    """The oracle's ℓ_b from one sample's logits, in float64: the shifted token cross-entropy averaged over the
    scored positions, or the class cross-entropy."""
    if task == "CAUSAL_LM":
        return lambda logits, labels: F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    return lambda logits, labels: F.cross_entropy(logits, labels)


def oracle(model, rows, task, clip, forward=None):
    """tests.oracle's float64 microbatch loop over ``rows`` (ids and mask stacked as one [B, 2, T] input)."""
    x = torch.stack([rows.columns["input_ids"], rows.columns["attention_mask"]], dim=1)
    forward = forward or (lambda m, xb: m(input_ids=xb[:, 0], attention_mask=xb[:, 1]).logits)
    return microbatch_reference(model, x, rows.columns["labels"], sample_loss(task), clip, forward=forward)


def flat(model, clipped):
    """The oracle's Σ_b c_b ∇ℓ_b flat over ``model.named_parameters()``, zeros where frozen."""
    return torch.cat([clipped[n].flatten() if n in clipped else torch.zeros(p.numel(), dtype=torch.float64)
                      for n, p in model.named_parameters()])


def trainer_for(model, rows, tmp_path, privacy_args, callbacks=(), **args):
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=len(rows), gradient_accumulation_steps=1, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    defaults.update(args)
    return DPTrainer(model=model, args=transformers.TrainingArguments(**defaults), train_dataset=rows,
                     data_collator=transformers.default_data_collator, privacy_args=privacy_args,
                     callbacks=list(callbacks))


def exact_privacy(clip, mode, sigma=0.0, **kwargs):
    return PrivacyArguments(noise_multiplier=sigma, per_sample_max_grad_norm=clip, poisson_sampling=False,
                            grad_sample_mode=mode, **kwargs)


def test_the_task_comes_from_peft_task_type_or_the_config():
    for name, (build, config, task) in MODELS.items():
        model = peft.get_peft_model(build(), config())
        assert model_task(model) == task, name
        assert model_task(build()) == task, name  # a plain model: from its config's auto mapping
    # a PEFT model without task_type: the transformers model under it decides
    assert model_task(peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"]))) == "CAUSAL_LM"

    class MyLM(transformers.GPT2LMHeadModel):  # a subclass: still the config's causal-LM class
        pass

    assert model_task(MyLM(tiny_gpt2().config)) == "CAUSAL_LM"
    token_cls = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], task_type="TOKEN_CLS"))
    with pytest.raises(NotImplementedError, match="task_type='TOKEN_CLS'.*override DPTrainer.dp_loss"):
        model_task(token_cls)
    with pytest.raises(NotImplementedError, match="BertModel.*neither.*task_type"):
        model_task(transformers.BertModel(tiny_bert().config))


def test_unwrap_model_understands_peft(tmp_path):
    model = peft.get_peft_model(tiny_gpt2(), MODELS["gpt2-lora"][1]())
    rows = rows_for("CAUSAL_LM", 4)
    trainer = trainer_for(model.float(), rows, tmp_path, PrivacyArguments(noise_multiplier=1.0))
    trainer.train()
    assert unwrap_model(trainer.dp_model) is model  # the user's module: save_pretrained writes the adapter
    base = unwrap_model(trainer.dp_model, peft=True)
    assert type(base) is transformers.GPT2LMHeadModel and base is model.get_base_model()
    assert unwrap_model(base, peft=True) is base


@pytest.mark.parametrize("mode", CLIPPING_MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_peft_step_is_the_float64_oracle_and_a_sample_moves_it_at_most_c(tmp_path, name, mode):
    """With noise 0, every step applies the float64 oracle's Σ_b c_b ∇ℓ_b over the trainable parameters (rtol 1e-10,
    or the fp32 tolerance for ROUNDS_IN_FP32; zero for the frozen base), with and without an adversarial sample,
    whose influence is ≤ C(1 + 1e-3)."""
    task = MODELS[name][2]
    if name == "gpt2-prefix":
        try:
            oracle(peft_model(name), rows_for(task, 1), task, 1.0)
        except RuntimeError as err:  # transformers < 4.49 builds GPT-2's mask with a prefix cache in float32 only
            if "without overflow" not in str(err):
                raise
            pytest.skip(f"transformers {transformers.__version__} cannot run a float64 prefix-tuned GPT-2 (its causal "
                        "mask overflows), which the oracle needs")
    adversarial, benign = with_adversary(name, 4)
    norms = oracle(peft_model(name), adversarial, task, 1.0).norms
    clip = float(norms.median())  # some samples clipped, some not, the adversary clipped
    assert (norms < clip).any() and norms[-1] > clip

    def make(rows):
        model = peft_model(name)
        expected = flat(model, oracle(model, rows, task, clip).clipped_sum)
        per_device = 2 if len(rows) % 2 == 0 else 1  # micro-batches of 2 (4 rows) or of 1 (3 rows)
        trainer = trainer_for(model, rows, tmp_path / str(len(rows)), exact_privacy(clip, mode),
                              per_device_train_batch_size=per_device, gradient_accumulation_steps=len(rows) // per_device)
        # one logical batch of L = len(rows) (sample rate 1); the step divides by L: scale back
        return Attempt(model, trainer.train, scale=len(rows), expected=expected)

    if name in ROUNDS_IN_FP32:
        def make_fp64(rows):  # the influence bound checked without the fp64 exactness; exactness at fp32 below
            attempt = make(rows)
            attempt.expected = None
            return attempt

        moved = influence(make_fp64, (adversarial, benign), clip=clip)
        attempt = make(adversarial)
        rtol, atol = TOLERANCES["fp32"]
        torch.testing.assert_close(run(attempt, NEVER), attempt.expected, rtol=rtol, atol=atol)
    else:
        moved = influence(make, (adversarial, benign), clip=clip)
    assert 0.5 * clip < moved <= clip * (1 + 1e-3)


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_lora_dropout_step_is_the_oracle_with_the_same_masks(tmp_path, mode):
    """LoRA with dropout (lora_dropout=0.5): the applied step equals the float64 oracle run with each sample's own
    dropout masks, recorded from the trainer's forward."""
    def build():
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", lora_dropout=0.5,
                                 fan_in_fan_out=True, init_lora_weights=False)
        return peft.get_peft_model(tiny_gpt2(), config).double()

    rows = rows_for("CAUSAL_LM", 4)
    model = build()
    masks = {}  # dropout module name -> the mask of the last forward [B, T, d]; "ids": that forward's input ids
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n:
            m.register_forward_hook(lambda m, inp, out, n=n: masks.__setitem__(n, (out / inp[0]).detach()))
    model.get_input_embeddings().register_forward_hook(lambda m, inp, out: masks.__setitem__("ids", inp[0]))
    trainer = trainer_for(model, rows, tmp_path, exact_privacy(0.05, mode))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()  # one micro-batch: the last forward's masks are the step's (the probe forward draws the same)
    ids = masks.pop("ids")  # the trainer's batch holds the rows in its sampler's order: row b of the oracle is
    order = [int((ids == rows.columns["input_ids"][b]).all(dim=1).nonzero()) for b in range(4)]  # its row order[b]
    masks = {n: m[order] for n, m in masks.items()}
    assert len(masks) == 2 and all(0.2 < float((m == 0).double().mean()) < 0.8 for m in masks.values())

    sample = {}

    def forward(m, xb):
        if not sample:  # on the oracle's copy: each dropout replays sample b's recorded mask
            for n, mod in m.named_modules():
                if n in masks:
                    mod.register_forward_hook(lambda mod, inp, out, n=n: inp[0] * masks[n][sample["b"]])
        sample["b"] = int(xb[0, 2, 0])
        return m(input_ids=xb[:, 0], attention_mask=xb[:, 1]).logits

    reference = build()
    x = torch.stack([rows.columns["input_ids"], rows.columns["attention_mask"],
                     torch.arange(4).unsqueeze(1).expand(4, T)], dim=1)
    step = microbatch_reference(reference, x, rows.columns["labels"], sample_loss("CAUSAL_LM"), 0.05, forward=forward)
    assert (step.norms > 0.05).any()
    rtol, atol = TOLERANCES["fp64"]
    for n, p in model.named_parameters():
        applied = (before[n] - p.detach()) * trainer.logical_batch_size
        expected = step.clipped_sum.get(n, torch.zeros_like(applied))
        torch.testing.assert_close(applied, expected, rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name,mode,checkpointing", [("gpt2-lora", "flash_fuse", True), ("gpt2-lora", "ghost", False),
                                                     ("llama-lora", "flash_fuse", False)])
def test_lora_on_the_fused_head_is_the_float64_oracle(tmp_path, name, mode, checkpointing):
    """fused_head="on": the fused head on the PEFT model's base model (the LoRA layers inside it; lm_head and the
    embedding frozen), in micro-batches, with HF gradient checkpointing (non-reentrant) or without: the step is the
    float64 oracle's Σ_b c_b ∇ℓ_b over the adapter, zero for the frozen base."""
    model = peft_model(name)
    rows = rows_for("CAUSAL_LM", 4)
    norms = oracle(model, rows, "CAUSAL_LM", 1.0).norms
    clip = float(norms.median())
    assert (norms > clip).any() and (norms < clip).any()
    expected = flat(model, oracle(model, rows, "CAUSAL_LM", clip).clipped_sum)
    checkpointing_args = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = trainer_for(model, rows, tmp_path, exact_privacy(clip, mode, fused_head="on"),
                          per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          **(checkpointing_args if checkpointing else {}))
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    trainer.train()
    fused = trainer.fused_model
    assert fused.model is model.get_base_model() and unwrap_model(trainer.dp_model) is fused
    assert not fused.head.weight.requires_grad and any("lora_" in n for n, _ in fused.named_parameters())
    applied = (before - torch.cat([p.detach().flatten() for p in model.parameters()])) * len(rows)
    rtol, atol = TOLERANCES["fp32" if name in ROUNDS_IN_FP32 else "fp64"]
    torch.testing.assert_close(applied, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("build,reason", [
    (lambda: peft_model("gpt2-prefix"), "PEFT's PREFIX_TUNING adds its virtual tokens in the PEFT model's forward"),
    (lambda: peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                               task_type="CAUSAL_LM")),
     r"output embeddings are peft\..*Linear, not torch\.nn\.Linear"),
], ids=["prefix_tuning", "lora_on_lm_head"])
def test_on_refuses_peft_models_the_fused_head_cannot_take(tmp_path, build, reason):
    """PEFT adds a prefix in its own forward, which the fused head (on the base model) does not run; LoRA on lm_head
    makes it another layer than an nn.Linear: "on" refuses them, naming why."""
    trainer = trainer_for(build(), rows_for("CAUSAL_LM", 4), tmp_path,
                          PrivacyArguments(noise_multiplier=1.0, fused_head="on"))
    with pytest.raises(ValueError, match=rf"fused_head='on'\): .*{reason}"):
        trainer.train()
    assert trainer.privacy_engine is None


def test_only_the_trainable_adapter_is_clipped_and_noised(tmp_path):
    """σ > 0: the optimizer holds exactly the trainable parameters (LoRA A/B and the modules_to_save head), which all
    move; the frozen base has no gradient and stays bit-identical."""
    model = peft.get_peft_model(tiny_bert(), MODELS["bert-lora-cls"][1]())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_for(model, rows_for("SEQ_CLS", 4), tmp_path, PrivacyArguments(noise_multiplier=1.0),
                          learning_rate=0.1)
    trainer.train()
    in_optimizer = {id(p) for group in trainer.dp_optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trainable}
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p.detach(), before[n]), f"{n} did not move"
        else:
            assert p.grad is None and torch.equal(p.detach(), before[n]), f"frozen {n} changed"


def test_save_model_writes_the_adapter_the_peft_way(tmp_path):
    from safetensors.torch import load_file

    model = peft.get_peft_model(tiny_gpt2(), MODELS["gpt2-lora"][1]())
    trainer = trainer_for(model, rows_for("CAUSAL_LM", 8), tmp_path / "run", PrivacyArguments(noise_multiplier=1.0),
                          per_device_train_batch_size=4, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert keys and all("lora_" in k for k in keys) and not any(k.startswith(("_module.", "module.")) for k in keys)
    reloaded = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "adapter"))
    for name, p in model.named_parameters():
        torch.testing.assert_close(reloaded.get_parameter(name), p, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("config", [
    lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
], ids=["prompt_tuning", "p_tuning"])
def test_prompt_tuning_is_refused_naming_the_layer(tmp_path, config):
    model = peft.get_peft_model(tiny_gpt2(), config())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_for(model, rows_for("CAUSAL_LM", 4), tmp_path, PrivacyArguments(noise_multiplier=1.0))
    with pytest.raises(NotImplementedError, match=r"prompt_encoder\.default\.embedding.*prefix tuning"):
        trainer.train()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_the_lora_example_runs(tmp_path, capsys, monkeypatch):
    """examples/hf_lora.py, a smoke run: pretraining, DP LoRA under the budget, the adapter saved and reloaded."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "hf_lora.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script: it imports examples/hf_causal_lm.py
    spec = importlib.util.spec_from_file_location("hf_lora_example", path)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclass resolves its annotations there
    spec.loader.exec_module(example)
    example.main(["--output_dir", str(tmp_path), "--max_steps", "2", "--pretrain_steps", "1", "--lora_r", "4",
                  "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--use_cpu", "true",
                  "--disable_tqdm", "true", "--target_epsilon", "8"])
    out = capsys.readouterr().out
    assert "trainable parameters of" in out and "after 2 DP steps" in out
    assert "saved: adapter_config.json, adapter_model.safetensors" in out and "the reloaded adapter" in out
    eps = float(out.split("epsilon ")[1].split()[0])
    assert 7.9 <= eps <= 8.0
