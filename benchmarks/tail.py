"""Cost of the DP tail over a model's gradients, multi-tensor Triton passes against the foreach references.

    python -m benchmarks.tail                      # GPT-2 small (163M fp32 gradients in 149 tensors) on CUDA
    python -m benchmarks.tail --device cpu --smoke # tiny GPT-2, interpreter (a few seconds)

Two tails, each timed in one process on the same gradients, with the Triton kernels and with
the ``torch`` backend (the foreach references):

* **clip** (the B = 1 shortcut of `FlashNormGradSampleModule`):
  s = Σ‖g‖² (`squared_norm`), c = min(1, C/(√s + 10⁻⁶))
  (`clipping_coef`), g ← c·g (`scale_`);
* **noise** (the optimizer's ``pre_step``: accumulate, noise, scale): per ~64M-element bucket one
  ``torch.normal``, then g ← (g + ξ) / B in one pass (``fused``), or ξ added then the scaling
  (``unfused``, the FSDP optimizer's order).

Host time: wall time of ``--reps`` calls issued back to back (no synchronisation inside), per call —
what the Python thread spends. GPU time: CUDA events around the same calls, per call. Minimum and median
over ``--trials`` trials.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch

from .history import describe, save_json
from .models import build_model


def _time(fn: Callable[[], None], device: torch.device, reps: int, trials: int) -> Dict[str, float]:
    host, gpu = [], []
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host.append((time.perf_counter() - t0) * 1e3 / reps)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            gpu.append(start.elapsed_time(end) / reps)
    out = {"host_ms_min": min(host), "host_ms_median": statistics.median(host)}
    if gpu:
        out.update(gpu_ms_min=min(gpu), gpu_ms_median=statistics.median(gpu))
    return out


def _print_profile(label: str, fn: Callable[[], None], reps: int) -> None:
    """cProfile of ``reps`` calls: the functions with the most own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        fn()
    profiler.disable()
    print(f"-- cProfile, {label}, {reps} calls")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(12)


def backends(device: torch.device):
    """The backends that can run here: Triton on CUDA or under TRITON_INTERPRET=1, the references everywhere."""
    from flashnorm.kernels.backend import INTERPRET

    return ("triton", "torch") if device.type == "cuda" or INTERPRET else ("torch",)


def measure(device: torch.device, smoke: bool, reps: int, trials: int, profile: bool = False) -> Dict:
    from flashnorm.kernels import multi_tensor
    from flashnorm.grad_sample.provenance import mark_clipped
    from flashnorm.norms.rounding import clipping_coef
    from flashnorm.optimizers import DPOptimizerFastGradientClipping

    torch.manual_seed(0)
    model = build_model("gpt2", seq_len=16, smoke=smoke, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]

    def clip(backend: str):
        def step():
            norm_sq = multi_tensor.squared_norm(grads, backend=backend)
            multi_tensor.scale_(grads, clipping_coef(norm_sq, None, 1.0), backend=backend)
            return norm_sq

        return step

    optimizer = DPOptimizerFastGradientClipping(torch.optim.SGD(params, lr=0.0), noise_multiplier=1.0,
                                                max_grad_norm=1.0, expected_batch_size=8)

    def noise(fused: bool):
        optimizer.fuses_noise_and_scale = fused

        def step():
            for p, g in zip(params, grads):
                p.grad = g
                if hasattr(g, "_processed"):  # the same tensors serve every call: not a reused gradient here
                    del g._processed
            mark_clipped(params, 1)  # stands in for the clipping workflow's record
            optimizer.pre_step()
            optimizer.zero_grad()

        return step

    results = {}
    before = os.environ.get("FLASHNORM_BACKEND")
    try:
        for backend in backends(device):
            os.environ["FLASHNORM_BACKEND"] = backend  # the optimizer's default backend (it takes no argument)
            for name, fn in (("clip", clip(backend)), ("noise fused", noise(True)), ("noise unfused", noise(False))):
                fn()  # compile, build the tables
                results[f"{name} / {backend}"] = _time(fn, device, reps, trials)
                if profile:
                    _print_profile(f"{name} / {backend}", fn, reps)
    finally:
        if before is None:
            os.environ.pop("FLASHNORM_BACKEND", None)
        else:
            os.environ["FLASHNORM_BACKEND"] = before
    return {"elements": sum(g.numel() for g in grads), "tensors": len(grads), "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tail", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny GPT-2 (CPU, interpreter)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of each tail")
    args = p.parse_args(argv)
    out = measure(torch.device(args.device), args.smoke, args.reps, args.trials, args.profile)
    print(f"{out['tensors']} gradients, {out['elements'] / 1e6:.1f}M elements, {args.device}")
    for name, r in out["results"].items():
        gpu = f"   GPU {r['gpu_ms_min']:7.3f} ms (median {r['gpu_ms_median']:.3f})" if "gpu_ms_min" in r else ""
        print(f"  {name:24s} host {r['host_ms_min']:7.3f} ms (median {r['host_ms_median']:.3f}){gpu}")
    if args.json:
        command = "python -m benchmarks.tail " + " ".join(sys.argv[1:] if argv is None else argv)
        meta = dict(describe(command, args.device), smoke=args.smoke, reps=args.reps, trials=args.trials)
        save_json(args.json, {"meta": meta, **out}, suite="tail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
