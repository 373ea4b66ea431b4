"""Where a private step's time goes on the GPU: a torch.profiler breakdown, mode against non-DP.

    python -m benchmarks.profile_step --workload gpt2 --batch 8 --seq 1024 --dtype bf16 --modes nondp,flash_fuse,flash

For each mode (same model, batch and seed): the median step time over ``--steps`` steps (CUDA
events, as the runner measures it), then ``--profiled`` steps under ``torch.profiler`` with CUDA
activity. Per step: GPU busy time (sum of kernel durations), kernel launches, and the kernels
grouped by family — GEMMs (cuBLAS/CUTLASS), FlashNorm's Triton norm kernels, attention, copies and
casts, elementwise, reductions, memset/memcpy, other — with the top kernels by GPU time. The
difference to non-DP per family is the breakdown of the gap; step time minus GPU busy
time is time the GPU waits for the CPU (Python, launches, host syncs).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from typing import Dict, Optional, Sequence

import torch

from .harness import MODES, StepTimer, make_step, quiet_warnings, set_precision_flags
from .history import describe, save_json
from .models import build_model, make_batch

#: Kernel families, first match wins (regular expressions on the kernel name, case-insensitive).
#: FlashNorm's Triton kernels are all named ``_<op>_kernel`` (norms, clipped gradients, per-sample
#: LayerNorm/RMSNorm gradients, the multi-tensor tail, copies).
FAMILIES = (
    ("flashnorm triton", r"^_\w+_kernel$"),
    ("attention", r"flash_fwd|flash_bwd|fmha|attention|sdpa|cudnn.*(fprop|dgrad|wgrad)|efficient"),
    ("gemm", r"gemm|nvjet|sm90_xmma|cutlass|cublas|magma|splitk"),
    ("reduce (norm, sum, softmax)", r"reduce|norm|softmax|cross_entropy|nll|sum_|welford|cunn_"),
    ("copy / cast", r"copy|cast|convert|transpose|cat|index|gather|scatter|embedding"),
    ("elementwise", r"elementwise|vectorized|unrolled|foreach|mul|add|fill"),
    ("memset / memcpy", r"memset|memcpy"),
)


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def profile_mode(cfg: Dict, steps: int, profiled: int, top: int) -> Dict:
    """Median step ms, then per-step GPU time by kernel family and the top kernels of ``profiled`` steps."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    model = build_model(cfg["workload"], seq_len=cfg["T"], smoke=cfg["smoke"], device=device)
    inputs, targets = make_batch(cfg["workload"], batch=cfg["B"], seq_len=cfg["T"], smoke=cfg["smoke"], device=device)
    step = make_step(cfg, model, inputs, targets)
    timer = StepTimer(device)
    for _ in range(5):
        timer(step)
    times = [timer(step)[0] for _ in range(steps)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer(step)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(profiled):
            timer(step)
    return {"mode": cfg["mode"], "ms": statistics.median(times), "peak_gib": peak,
            **kernel_breakdown(prof, profiled, top)}


def kernel_breakdown(prof, profiled: int, top: int) -> Dict:
    """Per step of a ``torch.profiler`` run over ``profiled`` steps: GPU busy ms (the kernels' summed durations),
    kernel launches, ms by kernel family (`FAMILIES`) and the ``top`` kernels as (name, ms, launches)."""
    kernels: Dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name][0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            kernels[ev.name][1] += 1
    by_family: Dict[str, float] = defaultdict(float)
    launches = 0
    for name, (us, count) in kernels.items():
        by_family[family(name)] += us / profiled / 1e3
        launches += count
    top_kernels = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "gpu_busy_ms": sum(by_family.values()),
        "launches": launches / profiled,
        "families_ms": dict(by_family),
        "top": [(name[:110], us / profiled / 1e3, count / profiled) for name, (us, count) in top_kernels],
    }


def report(results: Sequence[Dict]) -> str:
    base = next((r for r in results if r["mode"] == "nondp"), None)
    fams = sorted({f for r in results for f in r["families_ms"]}, key=lambda f: -max(r["families_ms"].get(f, 0) for r in results))
    head = f"{'':34}" + "".join(f"{r['mode']:>14}" for r in results)
    lines = [head]
    row = lambda label, fn: lines.append(f"{label:34}" + "".join(f"{fn(r):14.2f}" for r in results))  # noqa: E731
    row("step ms (median)", lambda r: r["ms"])
    if base:
        row("  ratio to non-DP", lambda r: r["ms"] / base["ms"])
    row("peak GiB", lambda r: r["peak_gib"])
    row("GPU busy ms", lambda r: r["gpu_busy_ms"])
    row("GPU idle ms (step - busy)", lambda r: r["ms"] - r["gpu_busy_ms"])
    row("kernel launches", lambda r: r["launches"])
    for f in fams:
        row(f"  {f}", lambda r, f=f: r["families_ms"].get(f, 0.0))
    for r in results:
        lines.append(f"top kernels of {r['mode']} (ms/step, launches/step):")
        for name, ms, count in r["top"]:
            lines.append(f"  {ms:8.3f} {count:6.1f}  {name}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="gpt2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--modes", default="nondp,flash_fuse,flash")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profiled", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny model (a CPU dry run of the script; no GPU kernels)")
    args = p.parse_args(argv)
    quiet_warnings()
    set_precision_flags()
    results = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"Unknown mode {mode!r}. Valid modes: {', '.join(MODES)}.")
        cfg = dict(workload=args.workload, B=args.batch, T=args.seq, dtype=args.dtype, mode=mode, device=args.device,
                   smoke=args.smoke)
        results.append(profile_mode(cfg, args.steps, args.profiled, args.top))
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{args.workload} B={args.batch} T={args.seq} {args.dtype} on {gpu}")
    print(report(results))
    if args.json:
        command = "python -m benchmarks.profile_step " + " ".join(sys.argv[1:] if argv is None else argv)
        save_json(args.json, {"meta": dict(describe(command, args.device), smoke=args.smoke), "workload": args.workload,
                              "B": args.batch, "T": args.seq, "dtype": args.dtype, "results": results},
                  suite="profile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
