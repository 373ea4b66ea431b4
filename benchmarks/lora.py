"""DP LoRA on the Llama-3.2-1B shape: FlashNorm ``flash_fuse`` against non-DP LoRA and Opacus ``hooks``.

    python -m benchmarks.lora                          # B×T = 8×1024 and 2×4096, bf16, one GPU (≈ 6 min)
    python -m benchmarks.lora --shapes 4x4096 --modes nondp,flash_fuse,ghost --repeat 5
    python -m benchmarks.lora --device cpu --smoke --out /tmp/lora.json   # a tiny Llama, the smoke test

The model is ``LlamaForCausalLM`` of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocab 128256, ``lm_head`` tied to ``embed_tokens``, SDPA attention; random weights from a config,
`benchmarks.models`' ``hf_llama1b_tied``) under PEFT LoRA: rank 16, alpha 32, no dropout, on every projection
of attention and MLP (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``); the base is frozen (≈ 11 M
trainable parameters of ≈ 1.25 B). Weights are fp32, the step runs under bf16 autocast (``--dtype``), as in
`benchmarks.run`. The loss is the token-level cross-entropy with the sequence as the privacy unit.

Modes (`benchmarks.harness`): ``nondp`` (plain PyTorch: LoRA without DP), ``flash_fuse`` (FlashNorm's
``make_private``), ``opacus_hooks`` (the ``opacus`` package's per-sample gradients), and on request FlashNorm's
``ghost``/``flash`` and ``opacus_ghost``. σ = 1, C = 1, SGD; Poisson sampling off (the step is timed, not the loader).

Each configuration runs in its own process forked from `benchmarks.run`'s fork server and is timed by
`benchmarks.harness.run_config` (device synchronised around each step, CUDA events; the median of at least
``--steps`` timed steps after ``--warmup``; peak ``cuda.max_memory_allocated``); OOM, errors and timeouts are
recorded. The whole plan runs ``--repeat`` times (default 3), each configuration in a fresh process every time: a
record's ``ms`` is the median of its repeats' medians (``runs_ms`` lists them), ``peak_gib`` the largest peak, and
``time_ratio``/``mem_ratio`` are to non-DP LoRA of the same shape in the same run. The JSON
(``benchmarks/results/lora_<gpu>.json`` by default) is ``{"meta", "records"}`` like the runner's, rewritten after
every configuration.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

from . import history
from .harness import MODES, split_mode
from .models import WORKLOADS, HFCausalLM, Workload, _HF_LLAMA, _hf_llama, _hf_llama_linears, _size

#: The workload this benchmark registers in `benchmarks.models.WORKLOADS` (the forked children import this
#: module through the workload's ``imports``, so they see it too).
WORKLOAD = "hf_llama1b_lora"
#: LoRA's settings (fixed: the children build the model from them).
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_SHAPES = ((8, 1024), (2, 4096))
DEFAULT_MODES = ("nondp", "flash_fuse", "opacus_hooks")
STEM = "lora"


def build_lora_llama(max_t: int, smoke: bool):
    """``hf_llama1b_tied`` (or its smoke size) under PEFT LoRA, as a workload module (``forward(ids) -> logits``)."""
    from peft import LoraConfig, get_peft_model

    base = _hf_llama(max_t, smoke).lm
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                        task_type="CAUSAL_LM")
    return HFCausalLM(get_peft_model(base, config))


# The fork server preloads this module (the workload's imports) and each child then re-runs ``python -m
# benchmarks.lora``'s main module as ``__mp_main__`` (multiprocessing's main fix-up), which runpy reports as a
# double import: harmless here (the registration below is idempotent), silenced in the server and its children.
warnings.filterwarnings("ignore", message=r"'benchmarks\.lora' found in sys\.modules", category=RuntimeWarning)

WORKLOADS.setdefault(WORKLOAD, Workload(
    WORKLOAD,
    shapes=DEFAULT_SHAPES,
    build=build_lora_llama,
    classes=lambda smoke: _size(_HF_LLAMA, smoke)["vocab"],
    token_input=True,
    smoke_shape=(2, 32),
    linears=_hf_llama_linears,  # the frozen base's layers still run forward and input-gradient GEMMs
    attention=lambda smoke: (_size(_HF_LLAMA, smoke)["n_layer"], _size(_HF_LLAMA, smoke)["d"]),
    imports=("transformers", "transformers.models.llama.modeling_llama", "peft", "benchmarks.lora"),
))


def _shapes(text: str):
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: give BxT pairs, e.g. 8x1024,2x4096")
    return shapes


def _modes(text: str):
    modes = [m.strip() for m in text.split(",") if m.strip()]
    valid = [m for m in MODES if not split_mode(m)[1]]
    bad = [m for m in modes if m not in valid]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode {', '.join(bad)}; valid: {', '.join(valid)}")
    if "nondp" not in modes:
        modes.insert(0, "nondp")  # the ratios' base
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=_shapes, default=None, help="BxT pairs (default 8x1024,2x4096)")
    parser.add_argument("--modes", type=_modes, default=list(DEFAULT_MODES), help="comma-separated; nondp is added")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 (fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--smoke", action="store_true", help="a tiny Llama of the same structure (CPU smoke run)")
    parser.add_argument("--repeat", type=int, default=None, help="runs of the plan, fresh processes (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps at least (default 10; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; smoke 1)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per configuration")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/lora_<gpu>.json)")
    parser.add_argument("--quiet", action="store_true")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu --smoke.")
    if args.shapes is None:
        args.shapes = [WORKLOADS[WORKLOAD].smoke_shape] if args.smoke else list(DEFAULT_SHAPES)
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    small = args.smoke
    for key, full, smoke in (("repeat", 3, 3), ("steps", 10, 3), ("warmup", 3, 1)):
        if getattr(args, key) is None:
            setattr(args, key, smoke if small else full)
    if args.repeat < 1 or args.steps < 1:
        raise SystemExit("--repeat and --steps must be at least 1")
    if args.out is None:
        gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None
        args.out = history.stable_path(STEM + ("_smoke" if args.smoke else ""), gpu)
    return args


def combine(runs: List[Dict]) -> Dict:
    """One record from the repeats of a configuration: the median of the ok runs' medians, the largest peak."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return dict(runs[-1], repeats=len(runs))
    record = dict(ok[0])
    record.update(
        ms=round(statistics.median(r["ms"] for r in ok), 4),
        runs_ms=[r["ms"] for r in ok],
        peak_gib=max(r["peak_gib"] for r in ok),
        steps=sum(r["steps"] for r in ok),
        repeats=len(runs),
    )
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed:
        record["message"] = f"{len(failed)} of {len(runs)} runs failed: {failed[0].get('message', '')[:300]}"
    return record


def metadata(args, argv: Sequence[str]) -> Dict:
    import importlib.metadata as md

    meta = history.describe("python -m benchmarks.lora " + " ".join(argv), args.device)
    for package in ("transformers", "peft", "opacus", "flashnorm", "triton"):
        try:
            meta["versions"][package] = md.version(package)
        except md.PackageNotFoundError:
            meta["versions"][package] = None
    import torch

    meta["versions"]["cuda"] = torch.version.cuda
    meta.update(device=args.device, complete=False, settings={
        "model": "LlamaForCausalLM, Llama-3.2-1B shape (2048 × 16, 32 heads, 8 KV heads, 8192, vocab 128256, "
                 "tied embeddings)" if not args.smoke else "LlamaForCausalLM, smoke size",
        "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA, "dropout": 0.0, "targets": list(LORA_TARGETS)},
        "dtype": args.dtype, "weights": "fp32 (bf16 = autocast)", "smoke": args.smoke, "steps": args.steps,
        "warmup": args.warmup, "repeat": args.repeat, "timeout_s": args.timeout, "optimizer": "SGD(lr=1e-4)",
        "noise_multiplier": 1.0, "max_grad_norm": 1.0, "poisson_sampling": False,
        "timing": "median over repeats (fresh processes) of the median per-step CUDA-event time; device "
                  "synchronised before and after every step",
    })
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .run import _context, add_ratios, launch

    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    configs = [dict(workload=WORKLOAD, B=b, T=t, dtype=args.dtype, mode=mode, device=args.device, smoke=args.smoke,
                    steps=args.steps, warmup=args.warmup, min_timed_s=0.0 if args.smoke else 0.75, max_steps=50)
               for b, t in args.shapes for mode in args.modes]
    from .plan import Config

    ctx = _context([Config(WORKLOAD, c["B"], c["T"], c["dtype"], c["mode"]) for c in configs])
    meta = metadata(args, argv)
    runs: Dict[tuple, List[Dict]] = {}
    started = time.monotonic()

    def write() -> None:
        records = [combine(r) for r in runs.values()]
        add_ratios(records)
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        history.save_json(args.out, {"meta": meta, "records": records})

    print(f"{len(configs)} configurations × {args.repeat} on {args.device} → {args.out}", flush=True)
    for repeat in range(args.repeat):
        for cfg in configs:
            record = launch(ctx, cfg, args.timeout)
            if record.get("gpu"):
                meta["gpu"] = record["gpu"]
            key = (cfg["B"], cfg["T"], cfg["mode"])
            runs.setdefault(key, []).append(record)
            write()
            if not args.quiet:
                state = f"{record['ms']:.2f} ms, {record['peak_gib']:.2f} GiB" if record.get("status") == "ok" else \
                    f"{record.get('status')}: {record.get('message', '')[:200]}"
                print(f"[run {repeat + 1}/{args.repeat}] B={cfg['B']} T={cfg['T']} {cfg['mode']}: {state}", flush=True)
    meta["complete"] = True
    write()
    if not args.quiet:
        records = [combine(r) for r in runs.values()]
        add_ratios(records)
        print(f"{'B':>3} {'T':>6} {'mode':<14} {'ms':>10} {'× non-DP':>9} {'GiB':>8} {'× non-DP':>9}")
        for r in records:
            if r.get("status") == "ok":
                print(f"{r['B']:>3} {r['T']:>6} {r['mode']:<14} {r['ms']:>10.2f} {r['time_ratio'] or 0:>9.2f} "
                      f"{r['peak_gib']:>8.2f} {r['mem_ratio'] or 0:>9.2f}")
            else:
                print(f"{r['B']:>3} {r['T']:>6} {r['mode']:<14} {r.get('status')}: {r.get('message', '')[:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
