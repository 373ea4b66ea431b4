"""Long-context training past the logit wall: FlashNorm's DP step with the fused head against non-private training.

Hugging Face causal LMs with tied embeddings, B = 1, bf16 weights, HF gradient checkpointing (non-reentrant), SGD:

* ``llama1b``: the Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocabulary
  128256), T = 16384, 32768, 65536;
* ``gpt2``: GPT-2 small (768, 12 layers, vocabulary 50257, positions as long as T), T up to 131072.

Modes (each configuration in its own process, so one OOM cannot spill into the next):

* ``flashnorm_fused``: FlashNorm ``flash_fuse`` on `flashnorm.integrations.fused_head.fused_causal_lm` (the DP
  step: per-sample clipping, noise σ = 1, the accountant's hook);
* ``liger``: non-private, the base model then Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` on ``lm_head``'s
  weight (non-private best practice; ``liger_kernel`` must be installed: CUDA only);
* ``hf``: non-private, the model's own loss (``labels=``): [T, V] logits;
* ``opacus_hooks``: Opacus's hooks mode on the model's logits;
* ``flashnorm_unfused`` (not run by default): FlashNorm ``flash_fuse`` on the model's logits.

Each record is ``{model, T, B, mode, status ("ok", "oom", "error: ..."), step_ms, peak_gib, gpu, ...}``: ``step_ms``
is the median of at least ``--steps`` CUDA-event step times after ``--warmup`` steps (forward, loss, backward,
``optimizer.step()`` and ``zero_grad()``, as `benchmarks.harness.StepTimer` times them); ``peak_gib`` is
``torch.cuda.max_memory_allocated`` over the timed steps. Records are written to ``--out`` after each
configuration; with ``--merge`` the file's records of other configurations are kept (a run split over several
commands)::

    python -m benchmarks.long_context --out benchmarks/results/long_context.json --models llama1b --seqs 32768
    python -m benchmarks.long_context --smoke --device cpu --out /tmp/lc.json     # tiny models, on the CPU
    python -m benchmarks.long_context --out benchmarks/results/long_context.json --readme README.md  # the table

``--readme`` runs nothing: it rewrites the README's region between ``<!-- long-context-table:start -->`` and
``<!-- long-context-table:end -->`` with `format_table` of the records in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

from . import history
from .harness import MAX_GRAD_NORM, NOISE_MULTIPLIER, StepTimer, _describe, _dummy_loader, _is_oom, quiet_warnings
from .models import _HF_GPT2, _HF_LLAMA

MODELS = {"llama1b": (16384, 32768, 65536), "gpt2": (16384, 32768, 65536, 131072)}
MODES = ("flashnorm_fused", "liger", "hf", "opacus_hooks", "flashnorm_unfused")
DEFAULT_MODES = MODES[:4]
SMOKE_SEQ = 64
LEARNING_RATE = 1e-4
IGNORE_INDEX = -100


# -- models and steps --------------------------------------------------------------------------------------------


def build_model(name: str, seq_len: int, smoke: bool, device):
    """The Hugging Face causal LM of ``name`` (tied embeddings, random weights, no dropout), bf16 on CUDA (float32
    on the CPU), with non-reentrant gradient checkpointing, in training mode."""
    import torch
    import transformers

    if name == "llama1b":
        s = _HF_LLAMA["smoke" if smoke else "full"]
        config = transformers.LlamaConfig(
            vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["hidden"], num_hidden_layers=s["n_layer"],
            num_attention_heads=s["n_head"], num_key_value_heads=s["n_kv"],
            max_position_embeddings=max(8192, seq_len), rope_theta=500000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, attn_implementation="sdpa", use_cache=False)
    elif name == "gpt2":
        s = _HF_GPT2["smoke" if smoke else "full"]
        config = transformers.GPT2Config(
            vocab_size=s["vocab"], n_embd=s["d"], n_layer=s["n_layer"], n_head=s["n_head"],
            n_positions=max(s["n_positions"], seq_len), tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, attn_implementation="sdpa", use_cache=False, bos_token_id=s["vocab"] - 1,
            eos_token_id=s["vocab"] - 1)
    else:
        raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(MODELS)}.")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "tied embeddings"
    with warnings.catch_warnings():  # (renamed activation_checkpointing_enable in recent transformers)
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_step(mode: str, model, ids) -> Callable[[], None]:
    """One training step of ``mode`` on ``ids`` [1, T] (labels = ids: the causal LM's), as a closure."""
    import torch
    import torch.nn as nn

    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    vocab = model.config.vocab_size
    loader = _dummy_loader(ids.shape[0])
    dp_model = None

    if mode == "hf":
        def loss_fn():
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    elif mode == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
        head = model.get_output_embeddings()
        shifted = nn.functional.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # as transformers shifts

        def loss_fn():
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            return liger(head.weight, hidden.reshape(-1, hidden.shape[-1]), shifted)
    elif mode == "opacus_hooks":
        from opacus import PrivacyEngine

        model, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM, grad_sample_mode="hooks", poisson_sampling=False)

        def loss_fn():
            logits = model(input_ids=ids, use_cache=False).logits
            return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
    elif mode in ("flashnorm_fused", "flashnorm_unfused"):
        from flashnorm import FlashNormPrivacyEngine
        from flashnorm.integrations.fused_head import fused_causal_lm
        from flashnorm.layers import PerSampleLoss

        fused = mode == "flashnorm_fused"
        module = fused_causal_lm(model) if fused else model
        dp_model, optimizer, criterion, _ = FlashNormPrivacyEngine().make_private(
            module=module, optimizer=optimizer, criterion=PerSampleLoss() if fused else nn.CrossEntropyLoss(),
            data_loader=loader, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
            grad_sample_mode="flash_fuse", poisson_sampling=False)
        steps = ids.shape[1]

        def loss_fn():
            if fused:
                return criterion(dp_model(input_ids=ids, labels=ids))
            logits = dp_model(input_ids=ids, use_cache=False).logits[:, :-1]
            return criterion(logits.reshape(-1, vocab).float(), ids[:, 1:].reshape(-1),
                             shape=(ids.shape[0], steps - 1, vocab))
    else:
        raise ValueError(f"Unknown mode {mode!r}. Valid modes: {', '.join(MODES)}.")

    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.dp_model = dp_model  # FlashNorm's grad-sample module (its path is recorded)
    return step


# -- one configuration, in its own process ---------------------------------------------------------------------


def run_config(cfg: Dict) -> Dict:
    """Builds, warms up and times one configuration; returns its record (never raises)."""
    import torch

    record = {"model": cfg["model"], "T": cfg["T"], "B": 1, "mode": cfg["mode"], "status": "ok", "step_ms": None,
              "peak_gib": None, "gpu": None}
    device = torch.device(cfg["device"])
    try:
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
            record["gpu"] = torch.cuda.get_device_name(device)
        model = build_model(cfg["model"], cfg["T"], cfg["smoke"], device)
        ids = torch.randint(0, model.config.vocab_size, (1, cfg["T"]), device=device)
        step = make_step(cfg["mode"], model, ids)
        timer = StepTimer(device)
        warmup = [timer(step)[0] for _ in range(max(1, cfg["warmup"]))]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        timed = [timer(step)[0] for _ in range(max(3, cfg["steps"]))]
        record.update(step_ms=round(statistics.median(timed), 3), steps_ms=[round(t, 3) for t in timed],
                      warmup_ms=[round(t, 3) for t in warmup])
        if step.dp_model is not None:  # B = 1 after B = 1: the one-sample path (forward hooks parked)
            record["one_sample_path"] = step.dp_model.hooks.parked
        if device.type == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 4)
            if cfg.get("profile"):
                record["profile"] = _profile(step, timer)
        else:
            import resource

            record["peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 4)
            record["memory_metric"] = "cpu max RSS"
    except BaseException as err:  # noqa: BLE001 - every failure is a result
        record["status"] = "oom" if _is_oom(err) else f"error: {_describe(err)}"
    return record


def _profile(step: Callable[[], None], timer) -> Dict:
    """One more step under ``torch.profiler``: its GPU time by kernel family and its top kernels
    (`benchmarks.profile_step.kernel_breakdown`)."""
    from torch.profiler import ProfilerActivity, profile

    from .profile_step import kernel_breakdown

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timer(step)
    return kernel_breakdown(prof, 1, 25)


def _child(conn, cfg: Dict) -> None:
    quiet_warnings()
    with contextlib.suppress(Exception):
        conn.send(run_config(cfg))
        conn.close()


def launch(ctx, cfg: Dict, timeout_s: float) -> Dict:
    """``cfg`` in a fresh process; a process that does not answer within ``timeout_s`` is killed (its record says so)."""
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(writer, cfg), daemon=True)
    started = time.monotonic()
    proc.start()
    writer.close()
    record = None
    if reader.poll(timeout_s):
        with contextlib.suppress(EOFError, OSError):
            record = reader.recv()
    if proc.is_alive():
        proc.kill()
    proc.join(timeout=30)
    reader.close()
    if record is None:
        why = (f"no result within {timeout_s:.0f} s (killed)" if time.monotonic() - started >= timeout_s
               else f"the process died without a result (exit code {proc.exitcode})")
        record = {"model": cfg["model"], "T": cfg["T"], "B": 1, "mode": cfg["mode"], "status": f"error: {why}",
                  "step_ms": None, "peak_gib": None, "gpu": None}
    record["process_s"] = round(time.monotonic() - started, 1)
    return record


# -- the run -------------------------------------------------------------------------------------------------------


# -- the README's table ------------------------------------------------------------------------------------------
TABLE_START, TABLE_END = "<!-- long-context-table:start -->", "<!-- long-context-table:end -->"
MODEL_LABELS = {"llama1b": "Llama-3.2-1B shape", "gpt2": "GPT-2 small"}
_FAILURES = {"oom": "OOM"}


def _cell(record: Optional[Dict], base: Optional[Dict] = None) -> str:
    """``step ms, peak GiB`` (with ``base``: and the ratios to it), or the failure."""
    if record is None:
        return "—"
    if record["status"] != "ok":
        return "**" + _FAILURES.get(record["status"], "fails") + "**"
    cell = f"{record['step_ms']:.0f} ms, {record['peak_gib']:.1f} GiB"
    if base is not None and base["status"] == "ok":
        cell += f" ({record['step_ms'] / base['step_ms']:.3f}× · {record['peak_gib'] / base['peak_gib']:.2f}×)"
    return cell


def format_table(data: Dict) -> str:
    """The README's table of a results file: per (model, T) the DP step on the fused head with its time and memory
    ratios to Liger's non-private step of the same run, then Liger, plain HF and Opacus's hooks mode."""
    records = {_key(r): r for r in data["records"]}
    rows = sorted({(r["model"], r["T"]) for r in data["records"]}, key=lambda k: (list(MODELS).index(k[0]), k[1]))
    gpus = sorted({r["gpu"] for r in data["records"] if r.get("gpu")})
    lines = [
        f"_Generated by `python -m benchmarks.long_context --readme` from `benchmarks/results/long_context.json`. "
        f"GPU: {', '.join(gpus) or 'none recorded'}; B = 1, bf16, Hugging Face gradient checkpointing, median step "
        f"time and peak memory; ratios to Liger-Kernel's non-private step in the same run; {_dp_path(data)}._",
        "",
        "| model | T | FlashNorm DP, fused head (× Liger) | non-DP, Liger fused CE | non-DP, plain HF | Opacus hooks |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model, seq in rows:
        get = lambda mode: records.get((model, seq, mode))  # noqa: E731
        lines.append(f"| {MODEL_LABELS.get(model, model)} | {seq:,} | {_cell(get('flashnorm_fused'), get('liger'))} | "
                     f"{_cell(get('liger'))} | {_cell(get('hf'))} | {_cell(get('opacus_hooks'))} |")
    return "\n".join(lines)


def _dp_path(data: Dict) -> str:
    """What the DP records say of their step's path (``one_sample_path``: hooks parked, one ordinary backward)."""
    dp = sorted((r for r in data["records"] if r["mode"] == "flashnorm_fused" and r["status"] == "ok"),
                key=lambda r: (r["model"], r["T"]))
    paths = {r.get("one_sample_path") for r in dp}
    if paths == {True}:
        return "the DP step took the one-sample path (one ordinary backward, the gradient clipped whole)"
    if paths == {False}:
        return "the DP step took the hooked path (norm pass and assembly)"
    one_sample = [f"{MODEL_LABELS[r['model']]} T = {r['T']:,}" for r in dp if r.get("one_sample_path")]
    if not one_sample:
        return "the DP step's path not recorded"
    return (f"the DP step took the one-sample path at {', '.join(one_sample)}; the other DP records do not say which "
            "path they took")


def _key(record: Dict) -> tuple:
    return record["model"], record["T"], record["mode"]


def configurations(args) -> List[Dict]:
    out = []
    for model in args.models:
        seqs = (SMOKE_SEQ,) if args.smoke else (args.seqs or MODELS[model])
        for seq in seqs:
            if not args.smoke and seq not in MODELS[model] and not args.any_seq:
                continue
            for mode in args.modes:
                out.append(dict(model=model, T=seq, mode=mode, device=args.device, smoke=args.smoke,
                                steps=args.steps, warmup=args.warmup, profile=args.profile))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON file of the records")
    parser.add_argument("--models", default=",".join(MODELS), type=lambda s: s.split(","))
    parser.add_argument("--seqs", default=None, type=lambda s: [int(v) for v in s.split(",")],
                        help="sequence lengths (default: each model's; others need --any-seq)")
    parser.add_argument("--any-seq", action="store_true", help="accept lengths outside the models' lists")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=3, help="timed steps (at least 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds per configuration")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help=f"tiny models at T = {SMOKE_SEQ}")
    parser.add_argument("--merge", action="store_true", help="keep the file's records of other configurations")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step per configuration (CUDA): its kernels in the record")
    parser.add_argument("--readme", default=None, help="run nothing: rewrite this README's table from --out")
    args = parser.parse_args(argv)
    if args.readme is not None:
        import json

        from .report import update_region

        with open(args.out) as fh:
            table = format_table(json.load(fh))
        if not update_region(args.readme, table, TABLE_START, TABLE_END):
            print(table)
            print(f"{args.readme}: no {TABLE_START} / {TABLE_END} markers; the table is above", file=sys.stderr)
            return 2
        return 0
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")

    meta = history.describe("python -m benchmarks.long_context " + " ".join(shlex.quote(a) for a in
                                                                          (argv if argv is not None else sys.argv[1:])),
                            "cpu")  # (the GPU's name is each record's)
    meta.update(smoke=args.smoke, settings=dict(
        B=1, dtype="bf16" if args.device.startswith("cuda") else "fp32", checkpointing="HF, non-reentrant",
        optimizer=f"SGD(lr={LEARNING_RATE})", noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
        steps=args.steps, warmup=args.warmup, timing="median of CUDA-event step times after warm-up",
        memory="torch.cuda.max_memory_allocated over the timed steps"))
    records: List[Dict] = []
    if args.merge and os.path.exists(args.out):
        import json

        with open(args.out) as fh:
            records = json.load(fh).get("records", [])
    ctx = mp.get_context("spawn")
    for cfg in configurations(args):
        record = launch(ctx, cfg, args.timeout)
        records = [r for r in records if _key(r) != _key(record)] + [record]
        history.save_json(args.out, {"meta": meta, "records": records})
        shown = f"{record['step_ms']} ms, {record['peak_gib']} GiB" if record["status"] == "ok" else record["status"]
        print(f"{record['model']} T={record['T']} {record['mode']}: {shown[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
