"""Hugging Face conventions: ``HfArgumentParser((TrainingArguments, PrivacyArguments))`` from the command line and
from JSON, the renamed clipping bound, and the privacy budget (training stops before a step would exceed it)."""

import json
import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from opacus.accountants import create_accountant  # noqa: E402

from flashnorm.integrations.transformers import ACCOUNTANT_NAME, DPTrainer, PrivacyArguments  # noqa: E402
from tests.integrations.test_transformers import lm_rows, make_trainer, tiny_gpt2  # noqa: E402

LOGGER = "flashnorm.integrations.transformers"


def parser():
    return transformers.HfArgumentParser((transformers.TrainingArguments, PrivacyArguments))


def test_hf_argument_parser_parses_the_command_line(tmp_path):
    training, privacy = parser().parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--per_device_train_batch_size", "2", "--max_grad_norm", "0",
        "--target_epsilon", "3", "--target_delta", "1e-6", "--per_sample_max_grad_norm", "0.25", "--max_epsilon", "4",
        "--grad_sample_mode", "ghost", "--accountant", "rdp", "--poisson_sampling", "false", "--log_loss", "False",
        "--fused_head", "on",
    ])
    assert training.max_grad_norm == 0 and training.per_device_train_batch_size == 2
    assert privacy == PrivacyArguments(target_epsilon=3.0, target_delta=1e-6, per_sample_max_grad_norm=0.25,
                                       max_epsilon=4.0, grad_sample_mode="ghost", accountant="rdp",
                                       poisson_sampling=False, log_loss=False, fused_head="on")
    with pytest.raises(ValueError, match="exactly one"):  # PrivacyArguments' own checks run at parse time
        parser().parse_args_into_dataclasses(args=["--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="fused_head='yes' is not one of 'auto', 'on', 'off'"):
        parser().parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--noise_multiplier", "1",
                                                   "--fused_head", "yes"])
    assert parser().parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--noise_multiplier", "1"])[1].fused_head == "auto"


def test_hf_argument_parser_parses_a_json_file_and_the_trainer_runs_on_it(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "max_steps": 2, "use_cpu": True,
        "report_to": [], "save_strategy": "no", "noise_multiplier": 0.9, "per_sample_max_grad_norm": 0.5,
        "accountant": "rdp",
    }))
    training, privacy = parser().parse_json_file(str(path))
    assert privacy == PrivacyArguments(noise_multiplier=0.9, per_sample_max_grad_norm=0.5, accountant="rdp")

    trainer = DPTrainer(model=tiny_gpt2(), args=training, train_dataset=lm_rows(8),
                        data_collator=transformers.default_data_collator, privacy_args=privacy)
    trainer.train()
    assert trainer.dp_optimizer.max_grad_norm == 0.5
    assert trainer.privacy_engine.accountant.history == [(0.9, 0.25, 2)]


@pytest.mark.parametrize("value", ["yes", "ON", "", "true"])
def test_an_invalid_fused_head_is_refused_listing_the_valid_ones(value):
    with pytest.raises(ValueError, match=f"fused_head={value!r} is not one of 'auto', 'on', 'off'"):
        PrivacyArguments(noise_multiplier=1.0, fused_head=value)


def test_the_former_name_max_grad_norm_still_works_with_a_warning():
    with pytest.warns(FutureWarning, match="per_sample_max_grad_norm"):
        privacy = PrivacyArguments(noise_multiplier=1.0, max_grad_norm=0.3)
    assert privacy.per_sample_max_grad_norm == 0.3
    with pytest.warns(FutureWarning, match="per_sample_max_grad_norm"):
        assert privacy.max_grad_norm == 0.3
    with pytest.raises(ValueError, match="give only per_sample_max_grad_norm"):
        PrivacyArguments(noise_multiplier=1.0, max_grad_norm=0.3, per_sample_max_grad_norm=0.5)
    with pytest.raises(ValueError, match="finite number > 0"):
        PrivacyArguments(noise_multiplier=1.0, per_sample_max_grad_norm=0.0)


def test_a_batch_clip_in_training_arguments_is_refused_naming_the_per_sample_bound(tmp_path):
    with pytest.raises(ValueError, match="max_grad_norm=0.5 clips the batch gradient.*per_sample_max_grad_norm 0.5"):
        make_trainer(tiny_gpt2(), lm_rows(4), tmp_path, PrivacyArguments(noise_multiplier=1.0), max_grad_norm=0.5)
    make_trainer(tiny_gpt2(), lm_rows(4), tmp_path, PrivacyArguments(noise_multiplier=1.0), max_grad_norm=0.0)


# -- the privacy budget ------------------------------------------------------------------------------------------
def epsilon(steps, sigma=1.0, q=0.25, delta=1e-5):
    """Opacus's RDP accountant after ``steps`` steps of (σ, q)."""
    accountant = create_accountant("rdp")
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(model, before):
    return all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_a_second_train_does_not_exceed_target_epsilon(tmp_path, caplog):
    """target_epsilon is the default budget: the planned run reaches it, and a second train() takes no step."""
    privacy = PrivacyArguments(target_epsilon=3.0, accountant="rdp")
    model = tiny_gpt2()
    trainer = make_trainer(model, lm_rows(16), tmp_path, privacy, per_device_train_batch_size=4, max_steps=3)
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.budget_stop is None  # the planned run is not cut
    spent = trainer.get_epsilon()
    assert 3.0 - 0.01 <= spent <= 3.0
    before = params(model)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = trainer.train()
    assert trainer.get_epsilon() == spent <= 3.0  # before the fix: 3.49 after 3 more steps
    assert trainer.privacy_engine.accountant.history == [(trainer.noise_multiplier, 0.25, 3)]
    assert same(model, before) and out.metrics["epsilon"] == spent
    assert "privacy budget reached" in caplog.text and "no DP step taken" in caplog.text


def test_the_budget_stops_training_before_the_step_that_would_exceed_it(tmp_path, caplog):
    """max_epsilon between ε after 3 and after 4 steps: the run stops after step 3 of 10, saves checkpoint-3 (with
    the accountant) although save_strategy is "no", and logs why."""
    budget = (epsilon(3) + epsilon(4)) / 2
    privacy = PrivacyArguments(noise_multiplier=1.0, max_epsilon=budget, accountant="rdp")
    trainer = make_trainer(tiny_gpt2(), lm_rows(16), tmp_path, privacy, per_device_train_batch_size=4, max_steps=10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    assert trainer.state.global_step == 3
    assert trainer.privacy_engine.accountant.history == [(1.0, 0.25, 3)]
    assert trainer.get_epsilon() == epsilon(3) <= budget < epsilon(4)
    assert trainer.budget_stop == (3, epsilon(3), pytest.approx(epsilon(4)))
    assert (tmp_path / "checkpoint-3" / ACCOUNTANT_NAME).is_file()
    assert "privacy budget reached at step 3" in caplog.text and f"{budget:.4g}" in caplog.text

    # resuming from that checkpoint takes no step: the budget is spent
    model = tiny_gpt2()
    resumed = make_trainer(model, lm_rows(16), tmp_path, privacy, per_device_train_batch_size=4, max_steps=10)
    before = params(model)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert same(model, before) and resumed.budget_stop[1] == epsilon(3)


def test_a_first_step_above_the_budget_is_not_taken(tmp_path):
    model = tiny_gpt2()
    before = params(model)
    privacy = PrivacyArguments(noise_multiplier=1.0, max_epsilon=epsilon(1) / 2, accountant="rdp")
    trainer = make_trainer(model, lm_rows(16), tmp_path, privacy, per_device_train_batch_size=4, max_steps=10)
    out = trainer.train()
    assert out.global_step == 0 and same(model, before) and trainer.privacy_engine is None


class KeepGoing(transformers.TrainerCallback):
    """Clears the stop the budget asked for (a misbehaving callback)."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = False


def test_a_step_past_the_budget_is_refused_even_when_a_callback_clears_the_stop(tmp_path):
    budget = (epsilon(2) + epsilon(3)) / 2
    model = tiny_gpt2()
    privacy = PrivacyArguments(noise_multiplier=1.0, max_epsilon=budget, accountant="rdp")
    trainer = make_trainer(model, lm_rows(16), tmp_path, privacy, per_device_train_batch_size=4, max_steps=10)
    trainer.add_callback(KeepGoing())  # after the budget's callback
    snapshots = []
    trainer.add_callback(type("Snap", (transformers.TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: snapshots.append(params(model))}))
    with pytest.raises(RuntimeError, match="refuses the DP step 3.*past the privacy budget.*no parameter changed"):
        trainer.train()
    assert trainer.privacy_engine.accountant.history == [(1.0, 0.25, 2)] and len(snapshots) == 2
    assert same(model, snapshots[-1])
    assert trainer.get_epsilon() <= budget


def test_max_epsilon_must_hold_the_planned_run():
    with pytest.raises(ValueError, match="max_epsilon=2.0 < target_epsilon=3.0"):
        PrivacyArguments(target_epsilon=3.0, max_epsilon=2.0)
    assert math.isinf(PrivacyArguments(target_epsilon=3.0, max_epsilon=math.inf).budget)
    assert PrivacyArguments(target_epsilon=3.0).budget == 3.0
    assert math.isinf(PrivacyArguments(noise_multiplier=1.0).budget)
