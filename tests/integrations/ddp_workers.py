"""What the spawned ranks of ``test_transformers_ddp.py`` run: ``DPTrainer`` under ``torchrun``'s environment.

Each rank, in the variables ``torchrun`` sets (``tests.integrations.ranks`` sets them; the Trainer's accelerate then
starts a gloo process group on CPU), trains every case in order, and saves ``{case: {...}}`` to ``<out>/rank<r>.pt``
for the test.
"""

from __future__ import annotations

import copy
import os
import traceback

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import flashnorm.integrations.transformers as dp_transformers
from flashnorm.integrations.privacy_arguments import AUTO_MIN_FUSED_TOKENS
from flashnorm.integrations.transformers import DPTrainer, PrivacyArguments
from tests.integrations.test_transformers import (
    FirstStep,
    lm_rows,
    make_trainer,
    tiny_gpt2,
)


class RecordingTrainer(DPTrainer):
    """Records this rank's micro-batches (their input_ids) and counts DDP's own gradient all-reduces."""

    def create_optimizer(self, *args, **kwargs):
        first = self.privacy_engine is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if first:
            self.ddp_reductions = []

            def counted_allreduce(group, bucket):
                self.ddp_reductions.append(bucket.index())
                return allreduce_hook(group, bucket)

            self.dp_model._module.register_comm_hook(None, counted_allreduce)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches = getattr(self, "micro_batches", []) + [inputs["input_ids"].clone()]
        return super().training_step(model, inputs, num_items_in_batch)


def _summary(trainer: RecordingTrainer) -> dict:
    return {
        "world_size": trainer.args.world_size,
        "gsm": type(trainer.dp_model).__name__,
        "ddp": type(trainer.dp_model._module).__name__,
        "ddp_module": type(trainer.dp_model._module.module).__name__,
        "fused": trainer.fused_model is not None,
        "optimizer": type(trainer.dp_optimizer).__name__,
        "ddp_reductions": len(trainer.ddp_reductions),
        "micro_batches": trainer.micro_batches,
        "history": list(trainer.privacy_engine.accountant.history),
        "epsilon": trainer.get_epsilon(),
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
    }


def exact_step(out_dir: str, clip: float, fused_head: str = "auto") -> dict:
    """One DP step, noise 0, no Poisson: L = 1 × 2 × 2 = the 4 samples of the training set."""
    model = tiny_gpt2()
    before = copy.deepcopy(model)
    capture = FirstStep()
    trainer = make_trainer(
        model, lm_rows(4), out_dir,
        PrivacyArguments(noise_multiplier=0.0, per_sample_max_grad_norm=clip, poisson_sampling=False,
                         fused_head=fused_head),
        trainer_cls=RecordingTrainer, callbacks=[capture], per_device_train_batch_size=1,
        gradient_accumulation_steps=2, ddp_timeout=120,
    )
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "saved"))  # written by rank 0
    before = {n: p.detach() for n, p in before.named_parameters()}
    return {**_summary(trainer), "grads": capture.grads, "before": before,
            "logical_batch_size": trainer.logical_batch_size}


def fused_auto_step(out_dir: str, clip: float) -> dict:
    """`exact_step` with fused_head="auto" where it wraps the model (CUDA, here pretended): micro-batches shorter than
    ``AUTO_MIN_FUSED_TOKENS`` take the wrapper's unfused path (the model's own lm_head)."""
    fused_tokens = dp_transformers._min_fused_tokens
    dp_transformers._min_fused_tokens = lambda setting, device: AUTO_MIN_FUSED_TOKENS if setting == "auto" else None
    try:
        return exact_step(out_dir, clip, fused_head="auto")
    finally:
        dp_transformers._min_fused_tokens = fused_tokens


def poisson_steps(out_dir: str) -> dict:
    """Six noisy DP steps (two epochs) with Poisson sampling: L = 1 × 2 × 2 = 4 of 16 samples, q = 1/4."""
    trainer = make_trainer(
        tiny_gpt2(), lm_rows(16), out_dir, PrivacyArguments(noise_multiplier=0.8, per_sample_max_grad_norm=1.0, accountant="rdp"),
        trainer_cls=RecordingTrainer, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=6,
        ddp_timeout=120,
    )
    trainer.train()
    return _summary(trainer)


def run(rank: int, out_dir: str, clip: float) -> None:
    """Body of every rank (in ``torchrun``'s environment, which ``tests.integrations.ranks`` sets): every case;
    results to ``out_dir/rank<r>.pt``."""
    results = {}
    for name, case in [("exact", lambda: exact_step(os.path.join(out_dir, "exact"), clip)),
                       ("fused_auto", lambda: fused_auto_step(os.path.join(out_dir, "fused_auto"), clip)),
                       ("fused_on", lambda: exact_step(os.path.join(out_dir, "fused_on"), clip, fused_head="on")),
                       ("poisson", lambda: poisson_steps(os.path.join(out_dir, "poisson")))]:
        try:
            results[name] = case()
        except Exception:  # noqa: BLE001 - reported by the test of that case
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
