"""Per-step Python/CPU overhead of FlashNorm's hooks and bookkeeping.

    python -m benchmarks.overhead                        # GPT-2 small, flash_fuse, T=16, B=1 and 8, bf16 on CUDA
    python -m benchmarks.overhead --mode flash --batch 8 --seq 64 --profile
    python -m benchmarks.overhead --device cpu --smoke   # tiny GPT-2, a few seconds
    python -m benchmarks.overhead --batch 8 --cuda-graphs  # both steps replayed from CUDA graphs

The GPU work is made trivially small (T=16 tokens per sequence) so that a step costs what the CPU
spends issuing it. Two measurements:

1. **Step time** (CUDA events, device synchronised around each step, median): non-DP and the mode,
   same model and batch. Their difference is the per-step overhead of private training at this
   size: FlashNorm's hooks and bookkeeping plus the DP optimizer's noise.
2. **Breakdown** (CPU wall time per step, exclusive): the step's phases (forward, loss, backward,
   ``optimizer.step``, ``zero_grad``) and, inside them, FlashNorm's own functions — forward hooks,
   backward hooks and planner, norm-kernel launches, loss checks and clipping coefficients, the
   assembly of clipped gradients, other bookkeeping — and the autograd engine. The functions are
   wrapped with timers at run time in this process only (the library is not modified); timers on
   functions that a version of the library does not have are skipped.

``--profile`` adds a ``torch.profiler`` run of the mode whose ranges are the same categories: CPU self
time of the ops issued in each (and of its own Python), kernel launches per step and the top ops, as
shares of the step (the profiler inflates absolute times), and optionally a Chrome trace (``--trace PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .harness import GRAPHED, _StepTimer, make_step, quiet_warnings, set_precision_flags
from .history import describe, save_json
from .models import build_model, make_batch

#: Breakdown categories, in print order: (key, label, FlashNorm's own?).
CATEGORIES = (
    ("forward", "forward (model ops)", False),
    ("hooks_forward", "FlashNorm forward hooks (capture X, gradient tap)", True),
    ("loss", "loss (criterion)", False),
    ("backward", "backward glue (DP tensor / loss.backward)", False),
    ("graph", "CUDA-graph step (input copy, replay, gradients re-attached)", False),
    ("wait", "waiting for the GPU (the loss check's event)", False),
    ("autograd", "autograd engine (backward passes)", False),
    ("hooks_backward", "FlashNorm backward hooks (capture G, planner)", True),
    ("norms", "FlashNorm norm kernels (launch)", True),
    ("checks", "FlashNorm loss checks + clip coefficients (host sync)", True),
    ("assembly", "FlashNorm assembly of clipped gradients", True),
    ("bookkeeping", "FlashNorm other bookkeeping (zero-fill, B=1 shortcut)", True),
    ("optimizer.step", "optimizer.step (DP: scale, noise, SGD)", False),
    ("optimizer.zero_grad", "optimizer.zero_grad", False),
)


class Breakdown:
    """Exclusive CPU wall time per category: nested timed regions are subtracted from their parents."""

    def __init__(self):
        self.seconds: Dict[str, float] = defaultdict(float)
        self._stack: List[float] = []

    @contextlib.contextmanager
    def region(self, category: str):
        t0 = time.perf_counter()
        self._stack.append(0.0)
        try:
            yield
        finally:
            nested = self._stack.pop()
            dt = time.perf_counter() - t0
            self.seconds[category] += dt - nested
            if self._stack:
                self._stack[-1] += dt

    def wrap(self, fn: Callable, category: str) -> Callable:
        region = self.region

        def timed(*args, **kwargs):
            with region(category):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn
        return timed

    def reset(self) -> None:
        self.seconds.clear()


class Patches:
    """Wraps functions with :class:`Breakdown` timers; restores them on exit. Missing names are skipped."""

    def __init__(self, breakdown: Breakdown):
        self.breakdown = breakdown
        self._undo: list = []
        self.applied: List[str] = []

    def patch(self, owner, name: str, category: str) -> None:
        # Patch where the attribute is defined (a class in the MRO), once.
        target = owner
        if isinstance(owner, type):
            target = next((k for k in owner.__mro__ if name in vars(k)), None)
            if target is None:
                return
        original = vars(target).get(name) if hasattr(target, "__dict__") else None
        if original is None or getattr(original, "__wrapped__", None) is not None:
            return
        if isinstance(original, (staticmethod, classmethod, property)):
            return
        wrapped = self.breakdown.wrap(original, category)
        setattr(target, name, wrapped)
        self._undo.append((target, name, original))
        self.applied.append(f"{getattr(target, '__name__', target)}.{name} → {category}")

    def restore(self) -> None:
        while self._undo:
            target, name, original = self._undo.pop()
            setattr(target, name, original)


@contextlib.contextmanager
def instrumented(breakdown: Breakdown, flashnorm_too: bool):
    """Timers on the autograd entry points and (``flashnorm_too``) on FlashNorm's internals."""
    patches = Patches(breakdown)
    try:
        patches.patch(torch.autograd, "backward", "autograd")
        patches.patch(torch.autograd, "grad", "autograd")
        if flashnorm_too:
            from flashnorm.grad_sample import loss_check, one_pass, packed_grads, two_passes, workflow
            from flashnorm.norms import registry

            patches.patch(loss_check.FiniteLossCheck, "result", "wait")
            gsm = workflow.FlashNormGradSampleModule
            for name, category in (
                ("_capture_forward", "hooks_forward"), ("_capture_backward", "hooks_backward"),
                ("_check_loss", "checks"), ("get_clipping_coef", "checks"),
                ("clipped_backward", "bookkeeping"), ("_norm_pass", "bookkeeping"),
                ("compute_clipping_coef", "bookkeeping"), ("write_clipped_gradients", "bookkeeping"),
                ("_single_sample_backward", "bookkeeping"),
            ):
                patches.patch(gsm, name, category)
            for cls in (one_pass.GradSampleModuleFastGradientClippingFuse, two_passes.GradSampleModuleFastGradientClipping):
                patches.patch(cls, "_write_clipped_gradients", "assembly")
            patches.patch(workflow, "per_sample_norms", "norms")
            patches.patch(packed_grads.PackedPerSampleGrads, "norms", "norms")
            patches.patch(packed_grads.PackedPerSampleGrads, "clipped_sum", "assembly")
            patches.patch(workflow, "plan_packed_grads", "bookkeeping")
            rule_classes = {type(rule) for rule in registry.all_rules()}
            with contextlib.suppress(ImportError):
                from flashnorm.norms import PerSampleGradFallback

                rule_classes.add(PerSampleGradFallback)
            for cls in rule_classes:
                patches.patch(cls, "norm_sq", "norms")
                patches.patch(cls, "per_sample_grads", "norms")
                patches.patch(cls, "clipped_grads", "assembly")
        yield patches
    finally:
        patches.restore()


def _build(mode: str, args, batch: int, region=None):
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("gpt2", seq_len=args.seq, smoke=args.smoke, device=device)
    inputs, targets = make_batch("gpt2", batch=batch, seq_len=args.seq, smoke=args.smoke, device=device)
    step_mode = mode + GRAPHED if args.cuda_graphs else mode
    cfg = dict(workload="gpt2", B=batch, T=args.seq, dtype=args.dtype, mode=step_mode, device=args.device,
               smoke=args.smoke)
    return make_step(cfg, model, inputs, targets, region=region)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> List[float]:
    timer = _StepTimer(device)
    for _ in range(warmup):
        timer(step)
    return [timer(step)[0] for _ in range(steps)]


def breakdown_steps(mode: str, args, batch: int) -> Dict[str, float]:
    """ms per step in each category (CPU wall, exclusive), averaged over ``args.steps`` steps."""
    device = torch.device(args.device)
    bd = Breakdown()
    with instrumented(bd, flashnorm_too=mode != "nondp"):
        step = _build(mode, args, batch, region=bd.region)
        for _ in range(args.warmup):
            step()
        _sync(device)
        bd.reset()
        total = 0.0
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            total += time.perf_counter() - t0
        _sync(device)
    out = {k: v * 1e3 / args.steps for k, v in bd.seconds.items()}
    out["total"] = total * 1e3 / args.steps
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Prefix of the ``torch.profiler`` ranges that :func:`profile_flashnorm` opens around each timed region.
RANGE_PREFIX = "overhead::"
#: Bucket of CPU ops outside every region: on CUDA, the model's backward ops (autograd's device thread).
OUTSIDE = "outside the regions (model backward ops on autograd's thread, Python glue)"


class _ProfiledRegions(Breakdown):
    """:class:`Breakdown`'s regions as ``torch.profiler`` ranges named ``RANGE_PREFIX + category``, without timers."""

    def region(self, category: str):
        return torch.profiler.record_function(RANGE_PREFIX + category)


def profile_breakdown(events, steps: int) -> Dict[str, Dict]:
    """Per category: CPU self time (ms/step) of the ops it issued and of its own Python (the range's self
    time), kernel launches per step, and its top ops. Each CPU event goes to its innermost enclosing range,
    found through the profiler's parent links, which hold on every thread (the autograd engine's hooks
    included); events under no range go to ``OUTSIDE``."""
    out: Dict[str, Dict] = defaultdict(lambda: {"ms": 0.0, "launches": 0.0, "ops": defaultdict(float)})
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        node, category = ev, OUTSIDE
        while node is not None:
            if node.name.startswith(RANGE_PREFIX):
                category = node.name[len(RANGE_PREFIX):]
                break
            node = node.cpu_parent
        entry = out[category]
        entry["ms"] += ev.self_cpu_time_total / 1e3 / steps
        entry["launches"] += ("LaunchKernel" in ev.name) / steps
        op = "(Python in the region)" if ev.name.startswith(RANGE_PREFIX) else ev.name
        entry["ops"][op] += ev.self_cpu_time_total / 1e3 / steps
    return out


def profile_flashnorm(mode: str, args, batch: int, trace: Optional[str]) -> str:
    """``torch.profiler`` over a few steps of ``mode``, its CPU time split by the breakdown's categories."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    bd = _ProfiledRegions()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n = max(3, min(args.steps, 10))
    with instrumented(bd, flashnorm_too=True):
        step = _build(mode, args, batch, region=bd.region)
        for _ in range(args.warmup):
            step()
        _sync(device)
        with profile(activities=activities) as prof:
            for _ in range(n):
                step()
                _sync(device)
    if trace:
        prof.export_chrome_trace(trace)
    found = profile_breakdown(prof.events(), n)
    labels = {key: label for key, label, _ in CATEGORIES}
    order = [key for key, _, _ in CATEGORIES if key in found] + sorted(k for k in found if k not in labels)
    total = sum(entry["ms"] for entry in found.values()) or 1.0
    lines = [f"torch.profiler, {n} steps of {mode} (B={batch}, T={args.seq}): CPU self time of each category's ops "
             "and Python (the profiler inflates absolute times; read the shares), kernel launches, top ops:"]
    for key in order:
        entry = found[key]
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in sorted(entry["ops"].items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"  {labels.get(key, key)[:56]:<56} {entry['ms']:8.3f} ms/step {100 * entry['ms'] / total:5.1f}%"
                     f" {entry['launches']:6.0f} launches  [{top}]")
    if trace:
        lines.append(f"  Chrome trace: {trace}")
    return "\n".join(lines)


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
    result: Dict = {"B": batch, "T": args.seq, "mode": args.mode}
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
        f"GPT-2 small, B={result['B']}, T={result['T']}: step time (CUDA events / wall, median) "
        f"non-DP {result['step_ms']['nondp']:.3f} ms, {mode} {result['step_ms'][mode]:.3f} ms "
        f"→ step overhead {result['overhead_ms']:.3f} ms/step",
        f"FlashNorm hooks + bookkeeping, CPU: {result['flashnorm_cpu_ms']:.3f} ms/step (target < {target_ms:g} ms)",
        "",
        f"| {'category (CPU wall, exclusive, ms/step)':<56} | {'non-DP':>8} | {mode:>10} | {'Δ':>8} |",
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
            print(profile_flashnorm(args.mode, args, batch, args.trace))
        print()
    if args.json:
        command = "python -m benchmarks.overhead " + " ".join(sys.argv[1:] if argv is None else argv)
        meta = dict(describe(command, args.device), device=args.device, dtype=args.dtype, smoke=args.smoke,
                    cuda_graphs=args.cuda_graphs)
        save_json(args.json, {"meta": meta, "results": results}, suite="overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
