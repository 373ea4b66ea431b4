"""DP fine-tuning with LoRA through the Hugging Face Trainer: ``DPTrainer`` on a PEFT model, offline.

The recipe practised for private fine-tuning: a base model trained without privacy on public text, then only small
adapters trained with DP-SGD on the private text, the base frozen.

1. A byte-level Llama (vocabulary = the 256 byte values, built from a config: no download, no tokenizer) is
   pretrained briefly, non-privately, on the public text (this repository's README).
2. ``peft.get_peft_model`` adds LoRA adapters to its attention projections; ``DPTrainer`` trains them with DP-SGD
   on the "private" text (the documentation pages, 64-byte sequences, the privacy unit being one sequence). Only
   the adapters are clipped and noised; the budget (``--max_epsilon``, by default ``--target_epsilon``) is never
   exceeded.
3. ``save_model`` writes the adapter the PEFT way (``adapter_config.json``, ``adapter_model.safetensors``);
   ``PeftModel.from_pretrained`` loads it onto the base for the held-out perplexity.

Arguments are parsed by ``HfArgumentParser`` from ``TrainingArguments``, ``PrivacyArguments`` and the script's own
``LoraArguments``, on the command line or from a JSON file:

    pip install -e ".[hf]"
    python examples/hf_lora.py                                      # ~2 min on a CPU core
    python examples/hf_lora.py --max_steps 3 --pretrain_steps 2     # a smoke run
    python examples/hf_lora.py --target_epsilon 4 --lora_r 16 --per_sample_max_grad_norm 0.5
    python examples/hf_lora.py args.json                            # the same fields as JSON
"""

from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments,
                          default_data_collator)

from flashnorm.integrations.transformers import DPTrainer, PrivacyArguments
from hf_causal_lm import ByteSequences  # examples/hf_causal_lm.py (this folder is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapters' input."})
    lora_targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"],
                                    metadata={"help": "Modules that get adapters."})
    pretrain_steps: int = field(default=200, metadata={"help": "Non-private pretraining steps on public text."})


def byte_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def parse(argv: List[str]):
    parser = HfArgumentParser((TrainingArguments, PrivacyArguments, LoraArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    defaults = {"--output_dir": tempfile.mkdtemp(prefix="hf_lora_"), "--max_steps": "100",
                "--per_device_train_batch_size": "16", "--gradient_accumulation_steps": "4", "--learning_rate": "5e-3",
                "--lr_scheduler_type": "constant", "--logging_steps": "10", "--save_strategy": "no",
                "--report_to": "none", "--per_device_eval_batch_size": "64", "--target_epsilon": "8"}
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if "--noise_multiplier" in given:
        defaults.pop("--target_epsilon")
    extra = [item for key, value in defaults.items() if key not in given for item in (key, value)]
    return parser.parse_args_into_dataclasses(args=extra + argv)


def main(argv: List[str]) -> None:
    training_args, privacy_args, lora_args = parse(argv)
    public = ByteSequences((ROOT / "README.md").read_bytes(), SEQ)
    private = ByteSequences(b"\n".join(p.read_bytes() for p in sorted((ROOT / "docs").rglob("*.md"))), SEQ)
    held_out = len(private) // 10
    train, test = torch.utils.data.random_split(private, [len(private) - held_out, held_out],
                                                generator=torch.Generator().manual_seed(0))
    out = Path(training_args.output_dir)

    # 1. non-private pretraining on public text (the plain Trainer)
    base = byte_llama()
    if lora_args.pretrain_steps > 0:
        Trainer(model=base, train_dataset=public, data_collator=default_data_collator, args=TrainingArguments(
            output_dir=str(out / "pretrain"), max_steps=lora_args.pretrain_steps, per_device_train_batch_size=16,
            learning_rate=3e-3, lr_scheduler_type="constant", save_strategy="no", report_to="none",
            logging_steps=max(1, lora_args.pretrain_steps // 4), use_cpu=training_args.use_cpu)).train()
    base.save_pretrained(out / "base")

    # 2. DP-SGD on the LoRA adapters only
    model = get_peft_model(base, LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha,
                                            lora_dropout=lora_args.lora_dropout,
                                            target_modules=list(lora_args.lora_targets), task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    trainer = DPTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                        data_collator=default_data_collator, privacy_args=privacy_args)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    print(f"LoRA: {trainable:,} trainable parameters of {total:,} (the rest frozen: no gradient, no noise)")
    print(f"{len(train)} private sequences, logical batch {trainer.logical_batch_size}, sample rate "
          f"{trainer.sample_rate:.4f}, noise multiplier {trainer.noise_multiplier:.3f}")
    print(f"epsilon {trainer.get_epsilon():.3f} (delta {privacy_args.target_delta}, budget "
          f"{privacy_args.budget}) after {trainer.state.global_step} DP steps")

    # 3. the adapter, saved the PEFT way and loaded onto the base
    trainer.save_model(str(out / "adapter"))
    print("saved:", ", ".join(sorted(p.name for p in (out / "adapter").iterdir() if p.name.startswith("adapter"))))
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base"), out / "adapter")
    after = Trainer(model=reloaded, args=TrainingArguments(output_dir=str(out / "eval"), report_to="none",
                                                           per_device_eval_batch_size=64,
                                                           use_cpu=training_args.use_cpu),
                    eval_dataset=test, data_collator=default_data_collator).evaluate()["eval_loss"]
    print(f"held-out perplexity per byte: {math.exp(before):.2f} before DP fine-tuning, {math.exp(after):.2f} after "
          "(the reloaded adapter)")


if __name__ == "__main__":
    main(sys.argv[1:])
