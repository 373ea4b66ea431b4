"""DPTrainer trains the loss the user configured, per sample, or refuses at ``train()`` naming the setting; the
logged training loss (not private) can be switched off."""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers.trainer_pt_utils import LabelSmoother  # noqa: E402

from flashnorm.integrations.transformers import DPTrainer, PrivacyArguments  # noqa: E402
from tests.integrations.test_transformers import (  # noqa: E402
    assert_matches, cls_rows, first_step, lm_rows, make_trainer, reference_grad, tiny_bert, tiny_gpt2,
)

EPS = 0.3


def smoothed_reference(model, rows, clip, causal):
    """Float64, one sample at a time, transformers' ``LabelSmoother`` on that sample alone: (Σ_b c_b ∇ℓ_b) / B."""
    ref = copy.deepcopy(model).double()
    params = dict(ref.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    smoother = LabelSmoother(epsilon=EPS)
    for i in range(len(rows)):
        sample = {k: v.unsqueeze(0) for k, v in rows[i].items()}
        labels = sample.pop("labels")
        loss = smoother(ref(**sample), labels, shift_labels=causal)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        for n, g in zip(params, grads):
            total[n] += torch.clamp(clip / (norm + 1e-6), max=1.0) * g
    return {n: g / len(rows) for n, g in total.items()}


def _differs(a, b):
    num = torch.sqrt(sum((a[n] - b[n]).square().sum() for n in a))
    return float(num / torch.sqrt(sum(b[n].square().sum() for n in b)))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", ["flash_fuse", "ghost"])
def test_label_smoothing_is_trained_per_sample(tmp_path, causal, mode):
    """The step applies the clipped mean of the per-sequence LabelSmoother losses (which differ from plain
    cross-entropy's), sequences with ignored positions included."""
    rows, model = (lm_rows(4), tiny_gpt2()) if causal else (cls_rows(4), tiny_bert())
    _, norms = reference_grad(model, rows, 1.0)
    clip = float(norms.median())
    reference = smoothed_reference(model, rows, clip, causal)
    assert _differs(reference, reference_grad(model, rows, clip)[0]) > 1e-2  # the setting matters
    _, grads, before = first_step(model, rows, tmp_path, clip, mode, label_smoothing_factor=EPS,
                                  gradient_accumulation_steps=2)
    assert_matches(model, grads, before, reference)


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_label_smoothing_on_labels_that_are_not_classes_is_refused(tmp_path, problem):
    """transformers disables label smoothing for a multi-label config and fails on float labels: DPTrainer
    refuses before any step (problem_type inferred from the labels)."""
    model = tiny_bert(1 if problem == "regression" else 3)
    before = copy.deepcopy(model)
    trainer = make_trainer(model, cls_rows(4, problem), tmp_path, PrivacyArguments(noise_multiplier=0.0),
                           label_smoothing_factor=EPS)
    with pytest.raises(ValueError, match=f"label_smoothing_factor={EPS}.*problem_type='{problem}'"):
        trainer.train()
    for name, p in model.named_parameters():
        assert torch.equal(p, before.get_parameter(name)), name


class ComputeLossOverride(DPTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return 2 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class BothOverridden(ComputeLossOverride):
    def dp_loss(self, model, inputs):
        return 2 * super().dp_loss(model, inputs)


def _focal(outputs, labels, num_items_in_batch=None):
    return outputs.logits.sum() * 0


@pytest.mark.parametrize("how", ["compute_loss", "compute_loss_func"])
def test_a_batch_loss_setting_is_refused_at_train(tmp_path, how):
    model = tiny_bert()
    before = copy.deepcopy(model)
    privacy = PrivacyArguments(noise_multiplier=0.0)
    if how == "compute_loss":
        trainer = make_trainer(model, cls_rows(4), tmp_path, privacy, trainer_cls=ComputeLossOverride)
        named = r"ComputeLossOverride.compute_loss \(an override\)"
    else:
        trainer = make_trainer(model, cls_rows(4), tmp_path, privacy)
        trainer.compute_loss_func = _focal
        named = r"Trainer\(compute_loss_func=...\)"
    with pytest.raises(NotImplementedError, match=f"DPTrainer refuses {named}.*Override DPTrainer.dp_loss"):
        trainer.train()
    assert trainer.privacy_engine is None  # refused before anything was made private
    for name, p in model.named_parameters():
        assert torch.equal(p, before.get_parameter(name)), name


def test_compute_loss_with_a_per_sample_dp_loss_trains_the_dp_loss(tmp_path):
    """Overriding dp_loss too: its per-sample loss (here 2ℓ_b, clipped per sample) is what is trained."""
    rows, model = cls_rows(4), tiny_bert()
    _, norms = reference_grad(model, rows, 1.0)
    clip = float(norms.median())
    doubled = copy.deepcopy(model)
    reference, _ = reference_grad(model, rows, clip / 2)  # c_b(2g_b) · 2g_b = 2 · c_b'(g_b) g_b with C' = C / 2
    reference = {n: 2 * g for n, g in reference.items()}
    _, grads, before = first_step(doubled, rows, tmp_path, clip, trainer_cls=BothOverridden,
                                  gradient_accumulation_steps=2)
    assert_matches(doubled, grads, before, reference)


@pytest.mark.parametrize("log_loss", [True, False])
def test_the_training_loss_is_logged_only_when_asked(tmp_path, log_loss):
    trainer = make_trainer(tiny_bert(), cls_rows(4), tmp_path,
                           PrivacyArguments(noise_multiplier=1.0, poisson_sampling=False, log_loss=log_loss),
                           max_steps=2)
    out = trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "epsilon" in logged and "learning_rate" in logged
    assert ("loss" in logged) == log_loss and ("train_loss" in logged) == log_loss
    assert ("train_loss" in out.metrics) == log_loss
    assert math.isnan(out.training_loss) != log_loss
