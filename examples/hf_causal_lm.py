"""DP fine-tuning of a causal LM with the Hugging Face Trainer: ``DPTrainer`` on real text, offline.

A byte-level GPT-2 (vocabulary = the 256 byte values, built from a config: no download, no tokenizer) learns
the text of this repository's documentation, 64-byte sequences, the privacy unit being one sequence. The
logical batch is ``--batch-size`` × ``--accumulation`` sequences, Poisson-sampled and accounted as one DP step;
the Trainer logs ε beside the loss. At the end the model is saved with ``save_model`` and reloaded with
``from_pretrained`` to report the held-out perplexity.

    pip install -e ".[hf]"
    python examples/hf_causal_lm.py                     # ~2 min on a CPU core
    python examples/hf_causal_lm.py --steps 10          # a smoke run
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from flashnorm.integrations.transformers import DPTrainer, PrivacyArguments

ROOT = Path(__file__).resolve().parents[1]


class ByteSequences(torch.utils.data.Dataset):
    """Consecutive ``length``-byte windows of ``text``: input_ids = labels (the model shifts them)."""

    def __init__(self, text: bytes, length: int):
        ids = torch.tensor(list(text[: len(text) // length * length]), dtype=torch.long)
        self.ids = ids.view(-1, length)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="DP steps (logical batches)")
    parser.add_argument("--batch-size", type=int, default=16, help="per-device micro-batch")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per logical batch")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--mode", default="flash_fuse")
    args = parser.parse_args()

    text = b"\n".join(p.read_bytes() for p in sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]))
    data = ByteSequences(text, 64)
    held_out = len(data) // 10
    train, test = torch.utils.data.random_split(data, [len(data) - held_out, held_out],
                                                generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))

    with tempfile.TemporaryDirectory() as out:
        trainer = DPTrainer(
            model=model,
            args=TrainingArguments(
                output_dir=out, per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.accumulation, max_steps=args.steps, learning_rate=args.lr,
                lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10), save_strategy="no",
                report_to=[], per_device_eval_batch_size=64,
            ),
            train_dataset=train, eval_dataset=test,
            privacy_args=PrivacyArguments(target_epsilon=args.epsilon, target_delta=args.delta,
                                          per_sample_max_grad_norm=args.max_grad_norm, grad_sample_mode=args.mode),
        )
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        print(f"{len(train)} training sequences, logical batch {trainer.logical_batch_size}, sample rate "
              f"{trainer.sample_rate:.4f}, noise multiplier {trainer.noise_multiplier:.3f}")
        print(f"epsilon {trainer.get_epsilon():.3f} (delta {args.delta}) after {trainer.state.global_step} DP steps")
        trainer.save_model(f"{out}/final")
        reloaded = DPTrainer(model=GPT2LMHeadModel.from_pretrained(f"{out}/final"), args=trainer.args,
                             eval_dataset=test, privacy_args=trainer.privacy_args)
        after = reloaded.evaluate()["eval_loss"]
    print(f"held-out perplexity per byte: {math.exp(before):.1f} before, {math.exp(after):.1f} after (reloaded model)")


if __name__ == "__main__":
    main()
