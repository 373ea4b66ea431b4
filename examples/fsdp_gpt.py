"""DP training of a GPT-2 sharded with FSDP2 over N processes, in FlashNorm's ``flash_fuse_fsdp`` mode.

The model is HF ``transformers``' GPT-2 built from a config (random weights, untied LM head; GPT-2 small
by default: 12 × 768, vocab 50257, causal SDPA attention), sharded block by block with
``flashnorm.utils.fsdp_utils.FSDP2Wrapper`` in bf16 mixed precision (fp32 reduction, norms and optimizer).
The data are random token sequences; the privacy unit is the sequence. A progress bar shows each step's loss
and time; the end prints the tokens/s and ε.

    torchrun --nproc_per_node=8 examples/fsdp_gpt.py                  # one node, 8 GPUs
    torchrun --nproc_per_node=2 examples/fsdp_gpt.py --device cpu --tiny   # CPU smoke check (gloo)

Several nodes: see docs/distributed.md. ``--mode nondp`` trains the same sharded model without DP (the
baseline of the step-time ratio); ``--json PATH`` writes the measurements (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from flashnorm import FlashNormPrivacyEngine
from flashnorm.utils.fsdp_utils import FSDP2Wrapper


def gpt2(tiny: bool, seq: int) -> GPT2LMHeadModel:
    """GPT-2 small (or a 2 × 64 model with vocab 1000) with an untied head, no dropout, SDPA attention."""
    sizes = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    if tiny:
        sizes = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, bos_token_id=999, eos_token_id=999)
    config = GPT2Config(**sizes, n_positions=max(seq, 1024), tie_word_embeddings=False, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny GPT-2 (smoke checks)")
    parser.add_argument("--mode", default="flash_fuse_fsdp", help="ghost_fsdp, flash_fsdp, flash_fuse_fsdp or nondp")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step (expected, with Poisson)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    parser.add_argument("--clip", type=float, default=1.0, help="max per-sample gradient norm C")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--no-poisson", action="store_true",
                        help="fixed local batches (a DistributedSampler) instead of Poisson sampling: for timing")
    parser.add_argument("--json", default=None, help="write the measurements here (rank 0)")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.seq = min(args.batch, 4), min(args.seq, 32)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


def main() -> None:
    args = parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")  # torchrun sets rank, world, address
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # the same initial weights on every rank: each keeps its shard of them
    with device:
        model = gpt2(args.tiny, args.seq)
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = FSDP2Wrapper(model, mp_policy=bf16 if args.dtype == "bf16" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    vocab = model.config.vocab_size

    global_batch = world * args.batch
    tokens = torch.randint(0, vocab, (64 * global_batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    dataset = TensorDataset(tokens)
    if args.no_poisson:  # each rank its own shard, args.batch per step: expected global batch W·batch
        loader = DataLoader(dataset, batch_size=args.batch, sampler=DistributedSampler(dataset, seed=1), drop_last=True)
    else:  # Opacus's distributed Poisson sampling: expected global batch W·batch, each rank its share
        loader = DataLoader(dataset, batch_size=global_batch)

    if args.mode == "nondp":
        engine, loss_fn = None, nn.CrossEntropyLoss()
    else:
        engine = FlashNormPrivacyEngine()
        model, optimizer, loss_fn, loader = engine.make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
            noise_multiplier=args.sigma, max_grad_norm=args.clip, grad_sample_mode=args.mode,
            poisson_sampling=not args.no_poisson,
        )

    times, local_tokens = [], 0
    batches = iter(loader)
    progress = tqdm(range(args.warmup + args.steps), desc="DP steps", disable=rank != 0)
    for step in progress:
        if step == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        (ids,) = next(batches)
        ids = ids.to(device)
        inputs, labels = ids[:, :-1], ids[:, 1:]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(inputs).logits.float()  # [B, T, V]; the loss in fp32
        batch, seq = inputs.shape
        # Token-level cross-entropy whose per-sample loss is the mean over the sequence's tokens.
        per_sequence = {} if engine is None else {"shape": (batch, seq, vocab)}
        loss = loss_fn(logits.reshape(-1, vocab), labels.reshape(-1), **per_sequence)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            local_tokens += batch * seq
        if rank == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}", ms=f"{elapsed * 1e3:.1f}", local_batch=batch)

    step_s = statistics.median(times)
    counts = torch.tensor([float(local_tokens)], device=device)
    dist.all_reduce(counts)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0], device=device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    result = {
        "mode": args.mode, "world_size": world,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "batch_per_rank": args.batch, "seq": args.seq, "poisson": not args.no_poisson,
        "parameters": sum(p.numel() for p in model.parameters()), "step_ms_median": step_s * 1e3,
        "tokens_per_s": counts.item() / sum(times), "peak_mem_gib_per_rank": [p.item() for p in peaks],
        "torch": torch.__version__,
    }
    if engine is not None:
        result["epsilon"] = engine.get_epsilon(delta=1e-5)
    if rank == 0:
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
