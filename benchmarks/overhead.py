"""Per-step Python/CPU overhead of FlashNorm's hooks and bookkeeping.

    python -m benchmarks.overhead                        # GPT-2 small, flash_fuse, T=16, B=1 and 8, bf16 on CUDA
    python -m benchmarks.overhead --mode flash --batch 8 --seq 64 --profile
    python -m benchmarks.overhead --device cpu --smoke   # tiny GPT-2, a few seconds
    python -m benchmarks.overhead --batch 8 --cuda-graphs  # both steps replayed from CUDA graphs
    OMP_NUM_THREADS=1 python -m benchmarks.overhead --device cpu --workload hf_gpt2_host --batch 8  # the CPU proxy
    OMP_NUM_THREADS=1 python -m benchmarks.overhead --device cpu --workload hf_gpt2_host_v512 --batch 8  # its host part

The GPU work is made trivially small (T=16 tokens per sequence) so that a step costs what the CPU
spends issuing it. Two measurements:

1. **Step time** (CUDA events, device synchronised around each step, median): non-DP and the mode,
   same model and batch. Their difference is the per-step overhead of private training at this
   size: FlashNorm's hooks and bookkeeping plus the DP optimizer's noise.
2. **Breakdown** (CPU self time per step under ``torch.profiler``, exclusive): the step's phases (forward,
   loss, backward, ``optimizer.step``, ``zero_grad``, ranges this benchmark opens) and, inside them, the
   phase ranges FlashNorm itself emits (`flashnorm.grad_sample.phases`): forward hooks, backward hooks,
   norm-kernel launches, loss checks and clipping coefficients, the write of clipped gradients, the norm
   pass's autograd engine, other bookkeeping. The profiler inflates absolute times: read the shares.

``--profile`` adds the top ops and kernel launches of each category, and optionally a Chrome trace
(``--trace PATH``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from flashnorm.grad_sample import phases

from .harness import GRAPHED, StepTimer, make_step, quiet_warnings, set_precision_flags
from .history import describe, save_json
from .models import build_model, make_batch

#: Breakdown categories, in print order: (key, label, FlashNorm's own?).
CATEGORIES = (
    ("forward", "forward (model ops)", False),
    ("hooks_forward", "FlashNorm forward hooks (capture X, gradient tap)", True),
    ("loss", "loss (criterion)", False),
    ("backward", "backward glue (DP tensor / loss.backward)", False),
    ("graph", "CUDA-graph step (input copy, replay, gradients re-attached)", False),
    ("autograd", "autograd engine in the norm pass (model backward ops)", False),
    ("hooks_backward", "FlashNorm backward hooks (capture G)", True),
    ("norms", "FlashNorm norm kernels (launch)", True),
    ("checks", "FlashNorm loss checks + clip coefficients (host sync)", True),
    ("assembly", "FlashNorm write of clipped gradients (assembly / 2nd pass)", True),
    ("bookkeeping", "FlashNorm other bookkeeping (zero-fill, B=1 shortcut)", True),
    ("optimizer.step", "optimizer.step (DP: scale, noise, SGD)", False),
    ("optimizer.zero_grad", "optimizer.zero_grad", False),
)

#: The library's own phase ranges (`flashnorm.grad_sample.phases`) → breakdown category. A test fails if the
#: library stops emitting one of them.
LIBRARY_RANGES = {
    phases.FORWARD_HOOK: "hooks_forward",
    phases.BACKWARD_HOOK: "hooks_backward",
    phases.NORMS: "norms",
    phases.CHECKS: "checks",
    phases.COEFFICIENTS: "checks",
    phases.WRITE: "assembly",
    phases.NORM_PASS: "autograd",
    phases.CLIPPED_BACKWARD: "bookkeeping",
    phases.SINGLE_SAMPLE: "bookkeeping",
}
#: Prefix of the ranges this benchmark opens around the step's own phases (forward, loss, backward, ...).
RANGE_PREFIX = "overhead::"
#: Bucket of CPU ops outside every range: on CUDA, the model's backward ops (autograd's device thread).
OUTSIDE = "outside"


def _step_region(category: str):
    return torch.profiler.record_function(RANGE_PREFIX + category)


def _category_of(name: str) -> Optional[str]:
    if name.startswith(RANGE_PREFIX):
        return name[len(RANGE_PREFIX):]
    return LIBRARY_RANGES.get(name)


def profile_breakdown(events, steps: int) -> Dict[str, Dict]:
    """Per category: CPU self time (ms/step) of the ops it issued and of its own Python (the range's self time),
    kernel launches per step, and its top ops. Each CPU event goes to its innermost enclosing range, found through
    the profiler's parent links, which hold on every thread (the autograd engine's hooks included); events under no
    range go to ``OUTSIDE``."""
    out: Dict[str, Dict] = defaultdict(lambda: {"ms": 0.0, "launches": 0.0, "ops": defaultdict(float)})
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        node, category = ev, OUTSIDE
        while node is not None:
            found = _category_of(node.name)
            if found is not None:
                category = found
                break
            node = node.cpu_parent
        entry = out[category]
        entry["ms"] += ev.self_cpu_time_total / 1e3 / steps
        entry["launches"] += ("LaunchKernel" in ev.name) / steps
        op = "(Python in the range)" if _category_of(ev.name) is not None else ev.name
        entry["ops"][op] += ev.self_cpu_time_total / 1e3 / steps
    return out


def profiled_steps(mode: str, args, batch: int, trace: Optional[str] = None):
    """``args.steps`` steps of ``mode`` under ``torch.profiler`` (CPU, and CUDA on a GPU): (per-category profile,
    wall ms per step under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step = _build(mode, args, batch, region=_step_region)
    for _ in range(args.warmup):
        step()
    _sync(device)
    total = 0.0
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            total += time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)
    return profile_breakdown(prof.events(), args.steps), total * 1e3 / args.steps


def breakdown_steps(mode: str, args, batch: int) -> Dict[str, float]:
    """ms per step in each category (CPU self time under the profiler, which inflates absolute times), and the
    profiled step's wall time as ``total``."""
    found, total = profiled_steps(mode, args, batch)
    out = {key: entry["ms"] for key, entry in found.items() if key != OUTSIDE}
    out["total"] = total
    return out


def profile_report(mode: str, args, batch: int, trace: Optional[str]) -> str:
    """The profile of ``mode`` by category, with kernel launches and top ops."""
    found, _ = profiled_steps(mode, args, batch, trace)
    labels = {key: label for key, label, _ in CATEGORIES}
    order = [key for key, _, _ in CATEGORIES if key in found] + sorted(k for k in found if k not in labels)
    total = sum(entry["ms"] for entry in found.values()) or 1.0
    lines = [f"torch.profiler, {args.steps} steps of {mode} (B={batch}, T={args.seq}): CPU self time of each "
             "category's ops and Python (the profiler inflates absolute times; read the shares), kernel launches, "
             "top ops:"]
    for key in order:
        entry = found[key]
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in sorted(entry["ops"].items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"  {labels.get(key, key)[:56]:<56} {entry['ms']:8.3f} ms/step {100 * entry['ms'] / total:5.1f}%"
                     f" {entry['launches']:6.0f} launches  [{top}]")
    if trace:
        lines.append(f"  Chrome trace: {trace}")
    return "\n".join(lines)


def _build(mode: str, args, batch: int, region=None):
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.workload, seq_len=args.seq, smoke=args.smoke, device=device)
    inputs, targets = make_batch(args.workload, batch=batch, seq_len=args.seq, smoke=args.smoke, device=device)
    step_mode = mode + GRAPHED if args.cuda_graphs else mode
    cfg = dict(workload=args.workload, B=batch, T=args.seq, dtype=args.dtype, mode=step_mode, device=args.device,
               smoke=args.smoke)
    return make_step(cfg, model, inputs, targets, region=region)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> List[float]:
    timer = StepTimer(device)
    for _ in range(warmup):
        timer(step)
    return [timer(step)[0] for _ in range(steps)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def flashnorm_cpu_ms(nondp: Dict[str, float], dp: Dict[str, float]) -> float:
    """CPU per step of FlashNorm's hooks and bookkeeping: its own timed functions, plus what its graph step
    costs beyond non-DP's (``--cuda-graphs``, where the hooks run at capture only). Waits for the GPU and
    the DP optimizer's noise tail are reported on their own lines, not here."""
    own = sum(dp.get(k, 0.0) for k, _, mine in CATEGORIES if mine)
    return own + max(0.0, dp.get("graph", 0.0) - nondp.get("graph", 0.0))


def run_batch(args, batch: int) -> Dict:
    device = torch.device(args.device)
    result: Dict = {"workload": args.workload, "B": batch, "T": args.seq, "mode": args.mode}
    step_ms = {}
    for mode in ("nondp", args.mode):
        step_ms[mode] = time_steps(_build(mode, args, batch), device, args.warmup, args.steps)
    result["step_ms"] = {m: round(_median(v), 4) for m, v in step_ms.items()}
    result["overhead_ms"] = round(result["step_ms"][args.mode] - result["step_ms"]["nondp"], 4)
    result["breakdown_ms"] = {m: {k: round(v, 4) for k, v in breakdown_steps(m, args, batch).items()}
                              for m in ("nondp", args.mode)}
    result["flashnorm_cpu_ms"] = round(flashnorm_cpu_ms(result["breakdown_ms"]["nondp"], result["breakdown_ms"][args.mode]), 4)
    return result


def format_result(result: Dict, target_ms: float) -> str:
    mode = result["mode"]
    nd, dp = result["breakdown_ms"]["nondp"], result["breakdown_ms"][mode]
    lines = [
        f"{result['workload']}, B={result['B']}, T={result['T']}: step time (CUDA events / wall, median) "
        f"non-DP {result['step_ms']['nondp']:.3f} ms, {mode} {result['step_ms'][mode]:.3f} ms "
        f"→ step overhead {result['overhead_ms']:.3f} ms/step",
        f"FlashNorm hooks + bookkeeping, CPU: {result['flashnorm_cpu_ms']:.3f} ms/step (target < {target_ms:g} ms)",
        "",
        f"| {'category (CPU self time, profiled, ms/step)':<56} | {'non-DP':>8} | {mode:>10} | {'Δ':>8} |",
        f"|{'-' * 58}|{'-' * 10}:|{'-' * 12}:|{'-' * 10}:|",
    ]
    known = set()
    for key, label, _ in CATEGORIES:
        known.add(key)
        a, b = nd.get(key, 0.0), dp.get(key, 0.0)
        if a == 0.0 and b == 0.0:
            continue
        lines.append(f"| {label:<56} | {a:8.3f} | {b:10.3f} | {b - a:+8.3f} |")
    other_nd = nd["total"] - sum(v for k, v in nd.items() if k != "total")
    other_dp = dp["total"] - sum(v for k, v in dp.items() if k != "total")
    for label, a, b in (("other (outside the timed regions)", other_nd, other_dp),
                        ("total CPU per step", nd["total"], dp["total"])):
        lines.append(f"| {label:<56} | {a:8.3f} | {b:10.3f} | {b - a:+8.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="flash_fuse", choices=("flash_fuse", "flash", "ghost"))
    p.add_argument("--workload", default="gpt2", choices=("gpt2", "hf_gpt2_host", "hf_gpt2_host_v512"),
                   help="gpt2: GPT-2 small; hf_gpt2_host: the host-cost proxy (benchmarks.models), for the CPU; "
                        "hf_gpt2_host_v512: the proxy with a 512-token vocabulary (no head arithmetic)")
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence (default 16: GPU work trivially small)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny GPT-2 (CPU smoke run)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="both steps (non-DP and the mode) replay their forward, loss and backward from a CUDA graph "
                        "(flashnorm.cuda_graphs.CudaGraphStep); hooks and launches then run at capture only")
    p.add_argument("--profile", action="store_true", help="also run torch.profiler, CPU time and launches per category")
    p.add_argument("--trace", default=None, help="Chrome trace path for --profile")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--target-ms", type=float, default=2.0)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu --smoke")
    if args.device == "cuda":
        args.device = "cuda:0"
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    quiet_warnings()
    set_precision_flags()
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    results = []
    for batch in batches:
        result = run_batch(args, batch)
        results.append(result)
        print(format_result(result, args.target_ms))
        if args.profile:
            print()
            print(profile_report(args.mode, args, batch, args.trace))
        print()
    if args.json:
        command = "python -m benchmarks.overhead " + " ".join(sys.argv[1:] if argv is None else argv)
        meta = dict(describe(command, args.device), device=args.device, dtype=args.dtype, smoke=args.smoke,
                    cuda_graphs=args.cuda_graphs)
        save_json(args.json, {"meta": meta, "results": results}, suite="overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
