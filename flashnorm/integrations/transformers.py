"""Hugging Face ``Trainer`` with FlashNorm's DP-SGD: `DPTrainer` and `PrivacyArguments`.

The privacy unit is the sequence (one row of the batch). One DP step per *logical batch* of
L = ``per_device_train_batch_size`` × ``gradient_accumulation_steps`` × world size samples:

* the logical batch is Poisson-sampled as a whole, at Opacus's rate for a loader of batch size L,
  q = 1 / ⌈N / L⌉, and cut into ``gradient_accumulation_steps`` micro-batches in sampled order (sizes
  differ by at most one; any of them may be empty);
* each micro-batch is back-propagated alone through FlashNorm's DP criterion, leaving Σ_b c_b ∇ℓ_b over
  its samples, c_b = min(1, C / (‖∇ℓ_b‖ + 1e-6)); every micro-batch but the last ends with a *skipped*
  optimizer step (Opacus's ``BatchMemoryManager`` protocol: the sums accumulate; no noise, no accounting);
* the last micro-batch's step adds N(0, σ²C²) once per element, divides by the expected logical batch
  size (``loss_reduction="mean"``) and steps the optimizer; the accountant records one step (σ, q).

The per-sample loss ℓ_b is the model's own loss on that sample alone (computed from the logits, not
from ``outputs.loss``, which is a batch mean). The task is found from PEFT's ``task_type`` for a PEFT model
(``CAUSAL_LM``, ``SEQ_CLS``), else from the model's config: the class that transformers' auto mappings give its
config (`model_task`):

* causal LM: cross-entropy of ``logits[t]`` against ``labels[t + 1]``, averaged over the sample's
  positions whose label is not -100 (a sample with none has ℓ_b = 0);
* sequence classification: the model's ``problem_type`` (inferred as transformers does when unset):
  cross-entropy (ignore_index -100), squared error, or binary cross-entropy averaged over the labels;
* with ``label_smoothing_factor`` ε, each cross-entropy term is transformers' ``LabelSmoother``'s,
  (1 - ε)·(-log p_y) + ε·mean_v(-log p_v), averaged over the sample's scored positions.

A causal LM's loss runs on FlashNorm's fused linear cross-entropy head where ``PrivacyArguments.fused_head`` says so
(by default on CUDA, for micro-batches of at least 16384 label positions; ``"on"``: always): ``make_private`` then
takes a `FusedHeadCausalLM` around the model (a PEFT model's base model) in its place, on the same Parameters, whose
forward computes the base model's hidden states and then the same ℓ_b (``labels`` as above, label smoothing
included) without the [B, T, V] logits, so the clipped gradient is the same; ``self.model`` stays the model that is
saved, checkpointed and evaluated. Under DDP each rank runs it on its own share, as any layer.

The logged training loss (``loss``, ``train_loss``) is computed before clipping and noise: it is not private
(``PrivacyArguments.log_loss=False`` leaves it out).

Several processes (``torchrun``, W > 1): the model is wrapped in PyTorch's ``DistributedDataParallel``
before ``make_private``, so FlashNorm's DDP classes run the step (each sample's norm on its own rank, no
reduction in the backward pass, one SUM all-reduce with the noise added once by rank 0; accelerate does not
wrap the model). Every rank draws the same logical batch (same seed) and keeps its share, the positions
≡ rank (mod W); the union of the shares is the logical batch, and the step divides by its expected size.

PEFT models (``peft.get_peft_model``: LoRA and the other adapters whose layers FlashNorm has rules for, and prefix
tuning) train as they come: only their trainable parameters (the adapters, PEFT's ``modules_to_save``) are in the
optimizer, so only they are clipped (C over all of them together) and noised; the frozen base gets no gradient.
``save_model`` writes the adapter the PEFT way (``adapter_config.json``, ``adapter_model.safetensors``); a causal
LM's fused head is built on the base model, whose layers hold the adapters (not for prefix tuning). Prompt
tuning and P-tuning are refused (PEFT embeds the virtual tokens once and repeats them over the batch, so their
per-sample gradients cannot be told apart).

The privacy budget (``PrivacyArguments.max_epsilon``, by default ``target_epsilon``): before every DP step the
accountant's ε after that step is computed on a copy of its history; training stops, with a checkpoint and a log
line, after the last step that stays within the budget, and a ``train()`` whose first step would exceed it takes no
step.

Needs the ``[hf]`` extra (``transformers``, ``accelerate``; ``peft`` for adapters). One process (CPU or one GPU) or
DDP. With ``TrainingArguments(bf16=True)`` the forward runs under the accelerator's autocast (the CPU tests cover
fp32).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import transformers
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
)
from transformers.trainer_utils import TrainOutput, get_last_checkpoint
from transformers.utils import logging

from ..accounting import epsilon, noise_multiplier
from ..criterion import DPLossFastGradientClipping, DPTensorFastGradientClipping
from ..layers import PerSampleLoss
from ..privacy_engine import FlashNormPrivacyEngine
from ..utils.export import peft_model_of, unwrap_model
from .fused_head import FusedHeadCausalLM, fused_head_unsupported
from .micro_batches import CollateOrEmpty, MicroBatchSampler
from .privacy_arguments import AUTO_MIN_FUSED_TOKENS, PrivacyArguments

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
#: The accountant's state in a checkpoint directory, beside the optimizer's.
ACCOUNTANT_NAME = "privacy_accountant.pt"
#: The tasks DPTrainer computes per-sample losses for, named as PEFT's ``task_type`` names them.
CAUSAL_LM, SEQ_CLS = "CAUSAL_LM", "SEQ_CLS"
#: PEFT's prefix tuning: its virtual tokens are embedded per sample (the other prompt-learning methods are refused).
_PREFIX_TUNING = "PREFIX_TUNING"


def _name(value) -> str:
    """A PEFT enum (``TaskType``, ``PeftType``) or a string, as the string."""
    return str(getattr(value, "value", value))


def _config_task(model: nn.Module) -> Optional[str]:
    """``CAUSAL_LM`` / ``SEQ_CLS`` when ``model`` is an instance of the class that transformers' auto mapping gives
    its config's class (its subclasses included), else ``None``."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    for task, mapping in ((CAUSAL_LM, MODEL_FOR_CAUSAL_LM_MAPPING), (SEQ_CLS, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)):
        try:
            classes = mapping[type(config)]
        except (KeyError, ValueError, ImportError, AttributeError):  # not in this mapping
            continue
        if isinstance(model, classes if isinstance(classes, tuple) else (classes,)):
            return task
    return None


def model_task(model: nn.Module) -> str:
    """The task whose per-sample loss `DPTrainer` computes for ``model`` (any wrapper around it): ``"CAUSAL_LM"`` or
    ``"SEQ_CLS"``.

    A PEFT model's ``task_type`` decides when it is set (``get_peft_model(..., LoraConfig(task_type="CAUSAL_LM"))``);
    otherwise the ``transformers`` model (under PEFT's wrappers) must be an instance of the causal-LM or
    sequence-classification class that transformers' auto mappings give its config's class.

    Raises:
        NotImplementedError: neither task (naming what was found): override ``DPTrainer.dp_loss``.
    """
    peft_model = peft_model_of(model)
    if peft_model is not None:
        task = peft_model.active_peft_config.task_type
        if task is not None:
            if _name(task) in (CAUSAL_LM, SEQ_CLS):
                return _name(task)
            raise NotImplementedError(
                f"DPTrainer computes per-sample losses for PEFT task types CAUSAL_LM and SEQ_CLS; this PEFT model has "
                f"task_type={_name(task)!r}: override DPTrainer.dp_loss for it."
            )
    base = unwrap_model(model, peft=True)
    task = _config_task(base)
    if task is None:
        raise NotImplementedError(
            "DPTrainer computes per-sample losses for causal-LM and sequence-classification models (found from PEFT's "
            f"task_type, or from the model's config through transformers' auto mappings); {type(base).__name__} "
            f"(config {type(getattr(base, 'config', None)).__name__}) is neither: give the PEFT config "
            "task_type='CAUSAL_LM' or 'SEQ_CLS', or override DPTrainer.dp_loss."
        )
    return task


def _is_datasets_dataset(dataset) -> bool:
    if not transformers.utils.is_datasets_available():
        return False
    import datasets

    return isinstance(dataset, datasets.Dataset)


def _min_fused_tokens(setting: str, device: torch.device) -> Optional[int]:
    """``FusedHeadCausalLM``'s ``min_fused_tokens`` for ``PrivacyArguments.fused_head=setting`` on ``device``, or
    ``None`` for the model's own logits: ``"on"`` 0 (every micro-batch); ``"auto"`` ``AUTO_MIN_FUSED_TOKENS`` on
    CUDA, ``None`` elsewhere; ``"off"`` ``None``."""
    if setting == "on":
        return 0
    if setting == "auto" and device.type == "cuda":
        return AUTO_MIN_FUSED_TOKENS
    return None


def _batch_size(inputs: Dict) -> int:
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError(f"The batch holds no tensor with a batch dimension (keys: {sorted(inputs)}).")


class DPTrainer(transformers.Trainer):
    """``transformers.Trainer`` that trains with DP-SGD (see the module docstring for the exact step).

    Example:
        >>> trainer = DPTrainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=4),
        ...                     train_dataset=train, data_collator=collator,
        ...                     privacy_args=PrivacyArguments(target_epsilon=8.0, per_sample_max_grad_norm=1.0))
        >>> trainer.train()          # logs "epsilon" with the loss; stops before ε would pass the budget
        >>> trainer.get_epsilon()    # ε at privacy_args.target_delta
        >>> trainer.save_model(path) # the plain model (keys without wrapper prefixes), or a PEFT model's adapter

    The model is used as it comes: a causal-LM or sequence-classification model, or a PEFT model (LoRA, prefix
    tuning) of one, ``labels`` in the batch (the task: `model_task`). Other models: override `dp_loss`. The trained
    loss is the configured one, per sample: ``label_smoothing_factor`` is applied to each sample's loss as
    transformers' ``LabelSmoother`` defines it (classification and causal LM); a ``compute_loss`` override or a
    ``compute_loss_func`` is refused at `train` unless `dp_loss` is overridden too (the training loss must be one
    value per sample). Checkpoints carry the accountant's history (``train(resume_from_checkpoint=...)`` goes on
    from it). Several processes (``torchrun``) train with DDP (module docstring). Refused: several GPUs in one
    process, fp16, DeepSpeed/FSDP, iterable datasets, ``TrainingArguments.max_grad_norm`` set to a batch clip (the
    per-sample bound is ``PrivacyArguments.per_sample_max_grad_norm``), PEFT prompt tuning and P-tuning.

    Attributes (after training starts):
        privacy_engine: the `FlashNormPrivacyEngine` (its ``accountant`` holds the history).
        dp_model: the grad-sample module around ``self.model`` (around ``fused_model`` when that is set), or
            around its DDP wrapper when W > 1 (``self.model`` stays the plain model).
        fused_model: the `FusedHeadCausalLM` around ``self.model`` (a PEFT model's base model) that
            ``make_private`` took in its place when ``PrivacyArguments.fused_head`` puts the causal LM's loss on the
            fused head (the same Parameters; its forward returns ℓ [B]); else ``None``.
        dp_optimizer: the DP optimizer (``self.optimizer`` is the accelerator's wrapper around it).
        noise_multiplier, sample_rate: σ and q of every DP step.
        budget_stop: after a run stopped by the privacy budget, (the global step, ε spent, ε the next step would
            have reached); else ``None``.
    """

    def __init__(self, *args, privacy_args: PrivacyArguments, **kwargs):
        super().__init__(*args, **kwargs)
        self.privacy_args = privacy_args
        self.privacy_engine: Optional[FlashNormPrivacyEngine] = None
        self.dp_model = None
        self.fused_model: Optional[FusedHeadCausalLM] = None
        self.noise_multiplier: Optional[float] = None
        self.sample_rate: Optional[float] = None
        self.dp_optimizer = None
        self._logical_loader: Optional[DataLoader] = None
        self._micro_batches: Optional[MicroBatchSampler] = None
        self._dp_batch_sampler: Optional[Sampler] = None
        self._next_epsilon: Optional[Tuple[tuple, float]] = None  # (the history it is for, ε after one more step)
        self.budget_stop: Optional[Tuple[int, float, float]] = None
        self._sigmas: Dict[tuple, float] = {}
        self._check_supported()
        self.add_callback(_PrivacyBudget(self))

    def _check_supported(self) -> None:
        args = self.args
        if args.n_gpu > 1:
            raise NotImplementedError(
                f"DPTrainer runs one device per process ({args.n_gpu} GPUs visible to this one): launch one process "
                "per GPU with torchrun (DDP), or set CUDA_VISIBLE_DEVICES."
            )
        if args.fp16:
            raise ValueError("fp16 needs a gradient scaler, which the DP step does not use: use bf16=True or fp32.")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("DPTrainer does not support DeepSpeed or FSDP through the Trainer.")
        batch_clip = args.max_grad_norm
        if batch_clip is not None and batch_clip not in (0, 1.0):  # 1.0: TrainingArguments' default
            raise ValueError(
                f"TrainingArguments.max_grad_norm={batch_clip} clips the batch gradient, which DPTrainer does not do: "
                "DP-SGD clips each sample. Give the per-sample bound as PrivacyArguments.per_sample_max_grad_norm "
                f"(--per_sample_max_grad_norm {batch_clip}) and leave max_grad_norm at its default (or 0)."
            )
        if batch_clip and not hasattr(transformers.Trainer, "_clip_grad_norm"):
            # transformers < 5.3 clips inline, with no method to override: its clip_grad_norm_ would edit the clipped
            # gradients (which the DP optimizer then refuses). A copy of the arguments without it; the user's stay.
            self.args = copy.copy(args)
            self.args.max_grad_norm = 0.0

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The Trainer's ``train``, after checking that the loss it would train is the one configured
        (`_check_trained_loss`) and that a PEFT model's adapter can be trained per sample; with
        ``privacy_args.log_loss=False`` the result carries no training loss.

        Takes no step when the first one would take ε past the budget (``PrivacyArguments.max_epsilon``, by default
        ``target_epsilon``): it logs why and returns at once (the accountant's history being that of this trainer,
        or of the checkpoint it resumes from)."""
        self._check_trained_loss()
        self._check_peft()
        spent = self._spent_before_training(resume_from_checkpoint)
        if spent is not None:
            return spent
        out = super().train(resume_from_checkpoint, *args, **kwargs)
        if not self.privacy_args.log_loss:
            metrics = {k: v for k, v in out.metrics.items() if k != "train_loss"}
            out = TrainOutput(out.global_step, float("nan"), metrics)
        return out

    def _check_trained_loss(self) -> None:
        """Raises unless `dp_loss` trains the loss the user configured: a ``compute_loss`` override or a
        ``compute_loss_func`` computes one batch loss, which cannot be clipped per sample, and `dp_loss`
        would silently train another one."""
        if type(self).dp_loss is not DPTrainer.dp_loss:
            return  # the user's per-sample loss
        settings = []
        if type(self).compute_loss is not transformers.Trainer.compute_loss:
            settings.append(f"{type(self).__name__}.compute_loss (an override)")
        if getattr(self, "compute_loss_func", None) is not None:
            settings.append("Trainer(compute_loss_func=...)")
        if settings:
            raise NotImplementedError(
                f"DPTrainer refuses {' and '.join(settings)}: it returns one loss for the batch, which cannot be "
                "clipped per sample, and DPTrainer would train its own per-sample loss instead. Override "
                "DPTrainer.dp_loss to return self.dp_criterion(loss_module)(output, target) of the per-sample form "
                "of your loss (compute_loss is then used for evaluation only), or remove the setting."
            )

    def _check_peft(self) -> None:
        """Refuses PEFT's prompt learning other than prefix tuning, naming the layer."""
        peft_model = peft_model_of(self.model)
        if peft_model is None:
            return
        config = peft_model.active_peft_config
        if getattr(config, "is_prompt_learning", False) and _name(config.peft_type) != _PREFIX_TUNING:
            raise NotImplementedError(
                f"DPTrainer cannot train PEFT's {_name(config.peft_type)} per sample: PEFT embeds the virtual tokens "
                f"once (prompt_encoder.{peft_model.active_adapter}.embedding, called on a batch of one) and repeats "
                "the embeddings over the batch, so FlashNorm has no per-sample gradient for that layer. Use prefix "
                "tuning (PrefixTuningConfig), whose virtual tokens are embedded per sample, or LoRA (LoraConfig)."
            )

    @property
    def task(self) -> str:
        """``"CAUSAL_LM"`` or ``"SEQ_CLS"``: the task whose per-sample loss `dp_loss` computes (`model_task`)."""
        return model_task(self.model)

    # -- data ----------------------------------------------------------------------------------------
    @property
    def logical_batch_size(self) -> int:
        """L = per-device batch × gradient accumulation steps × world size."""
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)

    def get_train_dataloader(self) -> DataLoader:
        """Micro-batches of the logical batches: ``gradient_accumulation_steps`` per logical batch.

        The logical batches come from a loader of batch size L over the training set (shuffled with
        ``data_seed``/``seed``, alike on every rank); `create_optimizer` hands it to ``make_private``
        and then draws them with Opacus's Poisson sampler. Each rank takes its share (`MicroBatchSampler`).
        """
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset.")
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError("DPTrainer needs a dataset with a length (Poisson sampling draws indices).")
        collator = self.data_collator  # unused columns dropped as the Trainer does
        if _is_datasets_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        generator = torch.Generator().manual_seed(seed)
        self._logical_loader = DataLoader(
            dataset,
            batch_size=self.logical_batch_size,
            sampler=RandomSampler(dataset, generator=generator),
            collate_fn=collator,
            generator=generator,
        )
        logical = self._dp_batch_sampler or self._logical_loader.batch_sampler  # Poisson's once make_private ran
        self._micro_batches = MicroBatchSampler(
            logical, self.args.gradient_accumulation_steps, self.args.process_index, self.args.world_size
        )
        return DataLoader(
            dataset,
            batch_sampler=self._micro_batches,
            collate_fn=CollateOrEmpty(collator, dataset),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    # -- privacy engine ------------------------------------------------------------------------------
    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer, then ``make_private`` on (model, optimizer, logical-batch loader): the model, or
        the causal LM on the fused head (`fused_model`, as ``PrivacyArguments.fused_head`` says), wrapped in DDP
        first when W > 1.

        The logical batches are then drawn by Opacus's ``UniformWithReplacementSampler`` at q with the loader's
        generator (seeded alike on every rank, so every rank draws the same logical batch), or by the plain
        loader without Poisson sampling. (Opacus's distributed sampler skips a rank's empty draws, which would
        desynchronise the ranks' steps.)

        σ is ``privacy_args.noise_multiplier`` or, for ``target_epsilon``, Opacus's ``get_noise_multiplier`` (`flashnorm.accounting.noise_multiplier`)
        for the run's DP steps (``max_steps``, or ⌈epochs × logical batches per epoch⌉) at rate q."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.privacy_engine is not None:
            return optimizer
        if self._logical_loader is None:
            raise RuntimeError("DPTrainer.create_optimizer runs inside train(), after get_train_dataloader().")
        pa = self.privacy_args
        self.fused_model = self._fused_model()
        sigma, self.sample_rate = self._privacy_parameters(len(self._logical_loader))
        self.noise_multiplier = sigma
        self.privacy_engine = FlashNormPrivacyEngine(accountant=pa.accountant)
        self.model.train()  # an evaluate() before train() leaves it in eval mode, which make_private refuses
        module = self.model if self.fused_model is None else self.fused_model
        if self.args.world_size > 1:  # FlashNorm's DDP classes; buffers are not broadcast at forward (a rank
            # with an empty micro-batch runs none), the replicas' buffers being DDP's broadcast at construction
            device_ids = [self.args.device.index] if self.args.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
        self.dp_model, self.dp_optimizer, _, _ = self.privacy_engine.make_private(
            module=module,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX) if self.fused_model is None else PerSampleLoss(),
            data_loader=self._logical_loader,
            noise_multiplier=sigma,
            max_grad_norm=pa.per_sample_max_grad_norm,
            poisson_sampling=pa.poisson_sampling,
            grad_sample_mode=pa.grad_sample_mode,
        )
        if pa.poisson_sampling:
            self._dp_batch_sampler = UniformWithReplacementSampler(
                num_samples=len(self._logical_loader.dataset), sample_rate=self.sample_rate,
                generator=self._logical_loader.generator,
            )
        else:
            self._dp_batch_sampler = self._logical_loader.batch_sampler
        self._micro_batches.logical = self._dp_batch_sampler
        self.optimizer = self.dp_optimizer
        self.model_wrapped = self.dp_model  # the training loop runs the wrapper; self.model stays the plain model
        return self.optimizer

    def _fused_model(self) -> Optional[FusedHeadCausalLM]:
        """The causal LM on the fused head, ``FusedHeadCausalLM(self.model)`` (a PEFT model's base model, whose
        layers hold the adapters) with the Trainer's label smoothing, when ``PrivacyArguments.fused_head`` asks for
        it and the model can take it; else ``None`` (the model's own logits). ``"auto"`` leaves an overridden
        `dp_loss` the model itself.

        Raises:
            ValueError: ``fused_head="on"`` and a model that cannot take the fused head, naming why.
        """
        setting = self.privacy_args.fused_head
        min_fused_tokens = _min_fused_tokens(setting, self.args.device)
        if min_fused_tokens is None or (setting == "auto" and type(self).dp_loss is not DPTrainer.dp_loss):
            return None
        reason = self._fused_head_unsupported()
        if reason is not None:
            if setting == "on":
                raise ValueError(f"PrivacyArguments(fused_head='on'): {reason}. Set fused_head='auto' or 'off' to "
                                 "train on the model's own logits.")
            return None
        smoother = self.label_smoother
        return FusedHeadCausalLM(unwrap_model(self.model, peft=True), min_fused_tokens=min_fused_tokens,
                                 label_smoothing=0.0 if smoother is None else float(smoother.epsilon))

    def _fused_head_unsupported(self) -> Optional[str]:
        """``None`` when the model's loss can run on the fused head, else why not."""
        try:
            task = self.task
        except NotImplementedError:  # neither task (a dp_loss override trains it)
            task = "neither CAUSAL_LM nor SEQ_CLS"
        if task != CAUSAL_LM:
            return f"the fused head computes a causal LM's loss, and the model's task is {task}"
        peft_model = peft_model_of(self.model)
        if peft_model is not None and getattr(peft_model.active_peft_config, "is_prompt_learning", False):
            return (f"PEFT's {_name(peft_model.active_peft_config.peft_type)} adds its virtual tokens in the PEFT "
                    "model's forward, which the fused head (on the base model) does not run")
        base = unwrap_model(self.model, peft=True)
        reason = fused_head_unsupported(base)
        if reason is not None:
            return f"{type(base).__name__} cannot take the fused head: {reason}"
        return None

    def _privacy_parameters(self, logical_batches: int) -> Tuple[float, float]:
        """(σ, q) of every DP step for ``logical_batches`` logical batches per epoch: q = 1 / logical_batches; σ is
        ``noise_multiplier`` or, for ``target_epsilon``, Opacus's ``get_noise_multiplier`` for the run's DP steps."""
        pa = self.privacy_args
        sample_rate = 1 / logical_batches
        if pa.noise_multiplier is not None:
            return pa.noise_multiplier, sample_rate
        steps = self.args.max_steps
        if steps <= 0:
            steps = math.ceil(self.args.num_train_epochs * logical_batches)
        key = (pa.target_epsilon, pa.target_delta, sample_rate, steps, pa.accountant)
        if key not in self._sigmas:  # a budget check before train() asks first
            self._sigmas[key] = noise_multiplier(
                target_epsilon=pa.target_epsilon, target_delta=pa.target_delta, sample_rate=sample_rate,
                steps=steps, accountant=pa.accountant,
            )
        return self._sigmas[key], sample_rate

    # -- the step ------------------------------------------------------------------------------------
    def dp_criterion(self, loss: nn.Module) -> DPLossFastGradientClipping:
        """FlashNorm's DP criterion around the loss module ``loss`` (``reduction="mean"``), for this run's
        grad-sample module and DP optimizer: ``dp_criterion(loss)(output, target, shape=None)`` → ℓ: [B]
        (``dp_criterion(PerSampleLoss())(losses)`` for per-sample losses a model computed itself)."""
        return DPLossFastGradientClipping(self.dp_model, self.dp_optimizer, loss, "mean")

    def dp_loss(self, model: nn.Module, inputs: Dict) -> DPTensorFastGradientClipping:
        """Per-sample losses ℓ: [B] of one micro-batch (``inputs`` holds ``labels``), as a DP tensor whose
        ``backward()`` writes Σ_b c_b ∇ℓ_b. Override for other heads: run ``model`` (the grad-sample module)
        and return `dp_criterion` applied to its output. On the fused head (`fused_model` set: with
        ``fused_head="on"``, an override gets it too) ``model(**inputs)`` returns ℓ [B] itself, labels included."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("DPTrainer needs `labels` in every batch (the per-sample loss is computed from them).")
        if self.fused_model is not None:
            return self.dp_criterion(PerSampleLoss())(model(labels=labels, **inputs))
        task = self.task
        logits = model(**inputs).logits
        if task == CAUSAL_LM:
            if logits.dim() != 3 or logits.shape[:2] != labels.shape:
                raise ValueError(
                    f"Causal-LM logits of shape {tuple(logits.shape)} do not match the labels' {tuple(labels.shape)}: "
                    "DPTrainer scores logits[:, t] against labels[:, t + 1] (override DPTrainer.dp_loss otherwise)."
                )
            b, t, v = logits.shape
            criterion = self.dp_criterion(self._cross_entropy())
            logits = logits if logits.dtype == torch.float64 else logits.float()  # bf16 autocast: the loss in fp32
            return criterion(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), shape=(b, t - 1, v))
        return self._classification_loss(unwrap_model(self.model, peft=True).config, logits, labels)

    def _cross_entropy(self) -> nn.CrossEntropyLoss:
        """Cross-entropy ignoring label -100, with the Trainer's label smoothing ε: per position
        (1 - ε)·(-log p_y) + ε·mean_v(-log p_v), transformers' ``LabelSmoother``, averaged per sample over its
        positions whose label is not ignored."""
        smoother = self.label_smoother
        if smoother is None:
            return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        return nn.CrossEntropyLoss(ignore_index=smoother.ignore_index, label_smoothing=float(smoother.epsilon))

    def _classification_loss(self, config, logits: torch.Tensor, labels: torch.Tensor) -> DPTensorFastGradientClipping:
        """transformers' ``ForSequenceClassificationLoss`` per sample: logits [B, K], labels [B] or [B, K]."""
        b, k = logits.shape
        problem = config.problem_type
        if problem is None:  # what transformers infers at the first loss
            if k == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "single_label_classification":
            return self.dp_criterion(self._cross_entropy())(logits, labels.view(-1))
        if self.label_smoother is not None:  # transformers' LabelSmoother fails on float labels too
            raise ValueError(
                f"label_smoothing_factor={self.args.label_smoothing_factor}: label smoothing applies to classes, "
                f"not to problem_type={problem!r}; set label_smoothing_factor=0."
            )
        if problem == "regression" and k == 1:
            return self.dp_criterion(nn.MSELoss())(logits.view(-1), labels.view(-1).to(logits.dtype))
        loss = nn.MSELoss() if problem == "regression" else nn.BCEWithLogitsLoss()
        # [B·K] element losses, averaged per sample over its K labels
        return self.dp_criterion(loss)(logits.reshape(-1), labels.reshape(-1).to(logits.dtype), shape=(b, k, 1))

    def training_step(self, model: nn.Module, inputs: Dict, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch: Σ_b c_b ∇ℓ_b accumulated; a skipped step unless it ends the logical batch (the
        Trainer then calls ``optimizer.step()``: noise, division, accountant step).

        Returns Σ_b ℓ_b / (expected logical batch size / W), detached: the logged loss, summed over the
        micro-batches and averaged over the ranks by the Trainer, is the logical batch's mean loss as the DP
        step weighs it (not private: see ``PrivacyArguments.log_loss``; 0 when that is False)."""
        self._check_budget()
        model.train()
        last = self.accelerator.sync_gradients  # the Trainer steps the optimizer after this micro-batch
        loss_sum = torch.zeros((), device=self.args.device)
        if _batch_size(inputs) == 0:
            self.dp_optimizer.zero_grad(set_to_none=True)  # nothing to add (summed sums stay)
        else:
            inputs = self._prepare_inputs(inputs)
            with self.accelerator.autocast():
                loss = self.dp_loss(model, inputs)
            loss.backward()
            if self.privacy_args.log_loss:
                loss_sum = loss.loss_per_sample.detach().sum()
        if not last:
            self.dp_optimizer.signal_skip_step(do_skip=True)
            self.dp_optimizer.step()
        return loss_sum / self.dp_optimizer.expected_batch_size

    def _clip_grad_norm(self, model):
        return None  # clipping is per sample (PrivacyArguments.per_sample_max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # the gradient norm before noise is not private: never logged

    # -- privacy accounting --------------------------------------------------------------------------
    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """ε spent so far at ``delta`` (default ``privacy_args.target_delta``), from the accountant's history (``inf``
        once a step had σ = 0)."""
        if self.privacy_engine is None:
            return 0.0
        return self.privacy_engine.get_epsilon(self.privacy_args.target_delta if delta is None else delta)

    # -- the privacy budget --------------------------------------------------------------------------
    def epsilon_after_next_step(self) -> float:
        """ε at ``target_delta`` that the accountant would report after one more DP step (σ, q), computed on a copy
        of its history (the accountant itself is not touched). Cached per history."""
        accountant = self.privacy_engine.accountant
        key = tuple(accountant.history)
        if self._next_epsilon is None or self._next_epsilon[0] != key:
            prospective = copy.deepcopy(accountant)
            prospective.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
            self._next_epsilon = (key, epsilon(prospective, self.privacy_args.target_delta))
        return self._next_epsilon[1]

    def within_budget(self) -> bool:
        """Whether one more DP step keeps ε ≤ the budget (``PrivacyArguments.max_epsilon``, else ``target_epsilon``,
        else none)."""
        budget = self.privacy_args.budget
        return math.isinf(budget) or self.epsilon_after_next_step() <= budget

    def _check_budget(self) -> None:
        """Raises before anything of a logical batch is computed when its step would exceed the budget (a loop that
        went on after the budget stopped it, e.g. a callback that cleared ``should_training_stop``)."""
        if self.privacy_engine is not None and not self.within_budget():
            raise RuntimeError(
                f"DPTrainer refuses the DP step {self.state.global_step + 1}: it would take ε from "
                f"{self.get_epsilon():.4g} to {self.epsilon_after_next_step():.4g}, past the privacy budget "
                f"{self.privacy_args.budget:.4g} (δ = {self.privacy_args.target_delta}); no parameter changed. The "
                "budget had stopped training: a callback must not clear control.should_training_stop."
            )

    def _budget_spent(self) -> None:
        """Records and logs that training stops because the next step would exceed the budget."""
        spent, after = self.get_epsilon(), self.epsilon_after_next_step()
        self.budget_stop = (self.state.global_step, spent, after)
        logger.warning(
            f"DPTrainer: privacy budget reached at step {self.state.global_step}: ε = {spent:.4g} (δ = "
            f"{self.privacy_args.target_delta}); the next DP step would reach ε = {after:.4g} > max_epsilon = "
            f"{self.privacy_args.budget:.4g}. Training stops here; a checkpoint is saved."
        )

    def _spent_before_training(self, resume_from_checkpoint) -> Optional[TrainOutput]:
        """When a budget is set and the first step of this ``train()`` would exceed it (the history of this trainer's
        accountant, or of the checkpoint it resumes from): logs why and returns the (empty) run's output, else
        ``None``."""
        pa = self.privacy_args
        if math.isinf(pa.budget):
            return None
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            path = os.path.join(checkpoint, ACCOUNTANT_NAME) if checkpoint else None
            if path is None or not os.path.isfile(path):
                return None  # the Trainer (or _load_optimizer_and_scheduler) says what is missing
            engine = FlashNormPrivacyEngine(accountant=pa.accountant)
            engine.accountant.load_state_dict(torch.load(path, weights_only=True))
        elif self.privacy_engine is not None:
            engine = self.privacy_engine
        else:
            engine = FlashNormPrivacyEngine(accountant=pa.accountant)  # a first step above the budget
        if self.noise_multiplier is None:
            if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
                return None  # get_train_dataloader says why
            self.noise_multiplier, self.sample_rate = self._privacy_parameters(
                math.ceil(len(self.train_dataset) / self.logical_batch_size))
        saved, self.privacy_engine = self.privacy_engine, engine
        try:
            if self.within_budget():
                return None
            self._budget_spent()
        finally:
            self.privacy_engine = saved
        logger.warning("DPTrainer: no DP step taken in this train() (the budget is spent).")
        metrics = {"train_runtime": 0.0, "epsilon": self.budget_stop[1]}
        return TrainOutput(self.state.global_step, float("nan"), metrics)

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """The Trainer's logging, with ``epsilon`` added once a DP step has been taken; without the training loss
        (``loss``, ``train_loss``: not private) when ``privacy_args.log_loss`` is False."""
        if not self.privacy_args.log_loss:
            logs = {k: v for k, v in logs.items() if k not in ("loss", "train_loss")}
        if self.privacy_engine is not None and len(self.privacy_engine.accountant) > 0:
            logs = {**logs, "epsilon": self.get_epsilon()}
        super().log(logs, *args, **kwargs)

    # -- checkpoints: the accountant's history travels with the optimizer's state ----------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.privacy_engine is not None and self.args.should_save:
            torch.save(self.privacy_engine.accountant.state_dict(), os.path.join(output_dir, ACCOUNTANT_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """Resuming restores the optimizer, the scheduler and the accountant's history (so ε goes on from there)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ACCOUNTANT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by DPTrainer, and resuming from it would restart "
                "the privacy accounting at ε = 0."
            )
        self.privacy_engine.accountant.load_state_dict(torch.load(path, weights_only=True))


class _PrivacyBudget(transformers.TrainerCallback):
    """After each DP step: when the next one would take ε past the budget and training would go on, stops training
    and asks for a checkpoint (the Trainer saves it before the loop ends), logging why."""

    def __init__(self, trainer: DPTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.privacy_engine is None or control.should_training_stop or state.global_step >= state.max_steps:
            return control  # the run ends here anyway
        if not trainer.within_budget():
            trainer._budget_spent()
            control.should_training_stop = True
            control.should_save = True
        return control
