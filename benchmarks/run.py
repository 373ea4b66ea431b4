"""End-to-end DP-SGD benchmark runner.

    python -m benchmarks.run --suite end_to_end                   # the end-to-end grid on one GPU, ≤ 8 min
    python -m benchmarks.run --workloads gpt2 --dtypes bf16 --seq 4096 --modes nondp,flash_fuse
    python -m benchmarks.run --device cpu --smoke                 # tiny shapes, every mode, seconds
    python -m benchmarks.run --device cpu --smoke --suite tied_models  # a suite's plan at tiny shapes
    python -m benchmarks.run --suite end_to_end --dry-run         # the plan and its predicted cost
    python -m benchmarks.run --suite tied_models                  # HF models with tied embeddings, ≤ 3 min

Modes: ``nondp`` (plain PyTorch), ``opacus_hooks`` and ``opacus_ghost`` (the real ``opacus`` package),
FlashNorm ``ghost``, ``flash``, ``flash_fuse``; ``nondp_graphed`` and ``flash_fuse_graphed`` replay the
forward, loss and backward from CUDA graphs (`flashnorm.CudaGraphStep`; ratios to ``nondp_graphed``).
Every configuration (workload, B, T, dtype, mode) runs in its own process, forked from a server that
has already imported torch, opacus and flashnorm, so a configuration costs its CUDA context and model
build, not the imports. Each has a time limit
(``--timeout``); the run has a budget (``--max-minutes``): once it is spent nothing new starts, and
what did not run is recorded as ``not_run``. OOM, errors and timeouts are recorded, never skipped.
The JSON (``--out``) is rewritten after every configuration, so a killed run keeps what it measured.
``--suite end_to_end`` writes ``benchmarks/results/e2e_<gpu>.json``, another suite
``e2e_<suite>_<gpu>.json``; the run it replaces goes to
``benchmarks/results/history.jsonl`` first (`benchmarks.history`). ``--repeat N`` runs the plan N
times, each configuration in a fresh process every time, and writes ``{"runs": [...]}``: the report's
table of repeated configurations.

Record fields: workload, B, T, dtype, mode, status (ok | oom | error | timeout | not_run), message,
ms (median step), ms_min/ms_mean/ms_p20/ms_p80, wall_ms, steps, warmup, peak_gib, static_gib,
time_ratio and mem_ratio (to non-DP of the same shape in this run), params, plan (FlashNorm's norm
methods per layer), setup_s, total_s; timeouts keep the step times seen (``steps_seen_ms``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

from . import history
from . import plan as planning
from .harness import DTYPES, MODES, is_flashnorm, ratio_base
from .history import git_commit as _git
from .models import WORKLOADS

#: File stem of the runner's results: ``benchmarks/results/<stem>_<gpu>.json``.
STEM = "e2e"
#: Modules the fork server imports once (a child pays for none of them).
# torch._dynamo: torch.optim imports it on first use (≈2 s per process otherwise).
PRELOAD = ["torch", "torch._dynamo", "triton", "opacus", "flashnorm", "resource", "benchmarks.models",
           "benchmarks.harness"]
#: Seconds a child gets past its own limit to report before it is killed.
GRACE_S = 3.0


# -- command line ----------------------------------------------------------------------------------


def _csv(kind: str, valid: Sequence[str]):
    def parse(text: str) -> List[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad)}; valid: {', '.join(valid)}")
        return items

    return parse


def _ints(text: str) -> List[int]:
    try:
        return [int(s.replace("k", "")) * (1024 if s.endswith("k") else 1) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (4096 or 4k), got {text!r}") from err


def _shapes(text: str) -> List[tuple]:
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            b, t = item.lower().split("x")
            out.append((_ints(b)[0], _ints(t)[0]))
        except (ValueError, IndexError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(f"expected BxT shapes like 1x4096,8x1k; got {item!r}") from err
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(planning.SUITES),
                   help=f"a preset grid in priority order ({', '.join(planning.SUITES)})")
    p.add_argument("--workloads", type=_csv("workload", list(WORKLOADS)), default=None,
                   help=f"comma list of {', '.join(WORKLOADS)} (default: the suite's, else all)")
    p.add_argument("--modes", type=_csv("mode", MODES), default=None,
                   help=f"comma list of {', '.join(MODES)} (default: the suite's, else all)")
    p.add_argument("--dtypes", type=_csv("dtype", DTYPES), default=None,
                   help="comma list of fp32 (TF32 off), bf16 (autocast); default: fp32,bf16 (fp32 on CPU)")
    p.add_argument("--batch", type=_ints, default=None, help="keep only these batch sizes, e.g. 1,8")
    p.add_argument("--seq", type=_ints, default=None, help="keep only these sequence lengths, e.g. 4096,16k")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help="explicit BxT shapes for every workload instead of its grid, e.g. 1x4096,8x1k")
    p.add_argument("--steps", type=int, default=None, help="minimum timed steps (default 10; tied_models 5; smoke 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps (default 3; tied_models 2; smoke 1; 2 once a step > 0.5 s)")
    p.add_argument("--min-timed-s", type=float, default=None,
                   help="time short steps for at least this long "
                        "(default 0.75 s; end_to_end 0.5 s; tied_models 0.25 s; smoke 0)")
    p.add_argument("--max-steps", type=int, default=200, help="cap on timed steps (default 200)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per configuration (default 60; end_to_end: 45; tied_models: 40)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="budget for the whole run: nothing starts once spent "
                        "(default: none; end_to_end: 8; tied_models: 3)")
    p.add_argument("--device", default=None,
                   help="cuda or cpu (default: cuda when available, and for a --dry-run without --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny models and shapes (CPU smoke test)")
    p.add_argument("--out", default=None,
                   help="results JSON (default: benchmarks/results/e2e_<gpu>.json for --suite, e2e_custom_<gpu>.json "
                        "otherwise, e2e_smoke_<device>.json for --smoke)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole plan this many times (fresh processes each time); the JSON holds every run")
    p.add_argument("--resume", action="store_true",
                   help="continue the results in --out: keep its shape groups that completed, re-run the others whole "
                        "(so every ratio still comes from one run)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with predicted seconds and exit")
    p.add_argument("--no-predict-skip", action="store_true",
                   help="run configurations the cost model predicts to exceed --timeout "
                        "(default: record them as timeout)")
    p.add_argument("--quiet", action="store_true", help="no per-configuration lines")
    return p


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fills defaults that depend on the suite, the device and ``--smoke``."""
    if args.device is None:  # a dry run plans the GPU run (the cost model's H200) unless it is a smoke run
        import torch

        args.device = "cuda" if torch.cuda.is_available() or (args.dry_run and not args.smoke) else "cpu"
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available() and not args.dry_run:
            raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu (with --smoke).")
    suite = planning.SUITE_DEFAULTS.get(args.suite, {})
    smoke = dict(steps=3, warmup=1, min_timed_s=0.0, timeout=60.0, max_minutes=None)
    base = dict(steps=10, warmup=3, min_timed_s=0.75, timeout=60.0, max_minutes=None)
    defaults = smoke if args.smoke else {**base, **suite}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    if args.repeat < 1 or (args.repeat > 1 and args.resume):
        raise SystemExit("--repeat must be at least 1, and a repeated run cannot --resume")
    if args.dtypes is None:
        args.dtypes = ["fp32"] if args.device == "cpu" else list(DTYPES)
    if args.workloads is None:
        suite_workloads = {group[0] for group in planning.SUITES.get(args.suite, ())}
        args.workloads = [w for w in WORKLOADS if w in suite_workloads] if args.suite else list(WORKLOADS)
    if args.modes is None:
        args.modes = list(planning.SUITE_MODES.get(args.suite, MODES))
    if args.out is None and not args.dry_run:
        if args.smoke:
            args.out = os.path.join(history.RESULTS_DIR, f"{STEM}_smoke_{args.device.split(':')[0]}.json")
        else:
            import torch

            gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None
            stem = STEM if args.suite == "end_to_end" else f"{STEM}_{args.suite or 'custom'}"
            args.out = history.stable_path(stem, gpu)
    return args


def make_plan(args) -> List[planning.Config]:
    if args.suite and not args.shapes:
        return planning.suite_configs(args.suite, args.workloads, args.dtypes, args.modes, args.batch, args.seq,
                                      smoke=args.smoke)
    return planning.grid_configs(args.workloads, args.dtypes, args.modes, smoke=args.smoke, batches=args.batch,
                                 seqs=args.seq, shapes=args.shapes)


# -- metadata and results -------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_metadata(args, argv: Sequence[str]) -> Dict:
    import torch

    return {
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "gpu": None,  # filled from the first configuration that reaches the GPU
        "host_cpu": platform.processor() or platform.machine(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "opacus": _version("opacus"),
            "flashnorm": _version("flashnorm"),
            "numpy": _version("numpy"),
        },
        "git": _git(),
        "settings": {
            "suite": args.suite, "smoke": args.smoke, "steps": args.steps, "warmup": args.warmup,
            "min_timed_s": args.min_timed_s, "max_steps": args.max_steps, "timeout_s": args.timeout,
            "max_minutes": args.max_minutes, "tf32": False, "optimizer": "SGD(lr=1e-4)",
            "noise_multiplier": 1.0, "max_grad_norm": 1.0,
            "loss": "token-level CE, per-sequence mean (privacy unit: sequence)",
            "timing": "median of per-step CUDA-event intervals; device synchronised before and after every step",
            "poisson_sampling": False,
        },
        "elapsed_s": 0.0,
        "complete": False,
    }


def add_ratios(records: List[Dict]) -> None:
    """time_ratio = ms / ms(non-DP), mem_ratio = peak / peak(non-DP), same workload, B, T, dtype, this run;
    a ``*_graphed`` mode's base is ``nondp_graphed``."""
    base = {
        (r["workload"], r["B"], r["T"], r["dtype"], r["mode"]): r
        for r in records
        if r["mode"] == ratio_base(r["mode"]) and r.get("status") == "ok"
    }
    for r in records:
        ref = base.get((r["workload"], r["B"], r["T"], r["dtype"], ratio_base(r["mode"])))
        ok = r.get("status") == "ok" and ref is not None
        r["time_ratio"] = round(r["ms"] / ref["ms"], 4) if ok and ref.get("ms") else None
        r["mem_ratio"] = round(r["peak_gib"] / ref["peak_gib"], 4) if ok and ref.get("peak_gib") else None


def write_results(path: str, meta: Dict, records: List[Dict], earlier: Sequence[Dict] = ()) -> None:
    """Atomic write of ``{"meta": ..., "records": [...]}``; after the ``earlier`` runs of a ``--repeat``,
    ``{"runs": [earlier..., this run]}``."""
    add_ratios(records)
    run = {"meta": meta, "records": records}
    history.save_json(path, {"runs": [*earlier, run]} if earlier or meta.get("repeat") else run)


# -- launching ------------------------------------------------------------------------------------


def _context(configs: Sequence[planning.Config] = ()):
    """The fork-server context, started (its imports done) before the first configuration is timed; it also
    imports what the workloads of ``configs`` build from (``transformers``' model modules)."""
    from .harness import noop

    ctx = mp.get_context("forkserver")
    extra = {module for cfg in configs for module in WORKLOADS[cfg.workload].imports}
    ctx.set_forkserver_preload(PRELOAD + sorted(extra))
    proc = ctx.Process(target=noop, daemon=True)
    proc.start()
    proc.join()
    return ctx


def launch(ctx, cfg: Dict, limit_s: float, on_step: Optional[Callable[[List[Dict]], None]] = None) -> Dict:
    """Runs ``cfg`` in a child process; kills it ``GRACE_S`` after ``limit_s``; always returns a record.
    ``on_step`` sees the steps reported so far (``{"phase", "ms"}`` each) after every step."""
    from .harness import child_main

    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child_main, args=(writer, cfg, limit_s), daemon=True)
    started = time.monotonic()
    proc.start()
    writer.close()
    progress: List[Dict] = []
    record = None
    deadline = started + limit_s + GRACE_S
    try:
        while record is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if reader.poll(min(left, 0.5)):
                try:
                    kind, payload = reader.recv()
                except (EOFError, OSError):
                    break
                if kind == "progress":
                    progress.append(payload)
                    if on_step is not None:
                        on_step(progress)
                else:
                    record = payload
            elif not proc.is_alive():
                if reader.poll(0.2):
                    continue
                break
    finally:
        if record is None and proc.is_alive():
            proc.kill()
        proc.join(timeout=15)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
        reader.close()
    elapsed = time.monotonic() - started
    if record is not None:
        record["process_s"] = round(elapsed, 3)
        return record
    record = {k: cfg[k] for k in ("workload", "B", "T", "dtype", "mode")}
    seen = {"warmup": [round(p["ms"], 3) for p in progress if p["phase"] == "warmup"],
            "timed": [round(p["ms"], 3) for p in progress if p["phase"] == "timed"]}
    if proc.exitcode is None or elapsed >= limit_s + GRACE_S - 0.01:
        last = progress[-1]["ms"] if progress else None
        record.update(status="timeout", message=(
            f"killed after {elapsed:.0f} s (limit {limit_s:.0f} s): {len(seen['warmup'])} warm-up and "
            f"{len(seen['timed'])} timed steps done" + (f", last step {last:.1f} ms" if last is not None else "")))
    else:
        code = proc.exitcode
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        hint = " (host out of memory?)" if code == -9 else ""
        record.update(status="error", message=f"the process died without a result: {why}{hint}")
    record["steps_seen_ms"] = {k: v for k, v in seen.items() if v}
    record["process_s"] = round(elapsed, 3)
    return record


def resume_state(path: str, configs: List[planning.Config]):
    """(kept records, configurations still to run, earlier metadata) for ``--resume``.

    A shape group (workload, B, T, dtype) is kept when it holds a record for every planned mode and
    none of them is ``not_run``; any other planned group is run again from scratch.
    """
    if not os.path.exists(path):
        return [], configs, []
    with open(path) as fh:
        data = json.load(fh)
    old = data.get("records", [])
    by_group: Dict[tuple, Dict[str, Dict]] = {}
    for r in old:
        by_group.setdefault((r["workload"], r["B"], r["T"], r["dtype"]), {})[r["mode"]] = r
    planned: Dict[tuple, List[str]] = {}
    for c in configs:
        planned.setdefault(c.shape_key, []).append(c.mode)
    done = {key for key, modes in planned.items()
            if all(m in by_group.get(key, {}) and by_group[key][m].get("status") != "not_run" for m in modes)}
    kept = [r for r in old if (r["workload"], r["B"], r["T"], r["dtype"]) in done]
    todo = [c for c in configs if c.shape_key not in done]
    earlier = list(data.get("meta", {}).get("earlier_runs", []))
    if data.get("meta"):
        earlier.append({k: v for k, v in data["meta"].items() if k != "earlier_runs"})
    return kept, todo, earlier


def _skip_record(cfg: planning.Config, status: str, message: str, predicted_s: Optional[float]) -> Dict:
    record = cfg.as_dict()
    record.update(status=status, message=message, predicted=True)
    if predicted_s is not None:
        record["predicted_s"] = round(predicted_s, 1)
    return record


def _prediction(cfg: planning.Config, records: List[Dict], args) -> tuple:
    """(predicted step seconds, basis): scaled from the nearest measured T of the series, else the cost model."""
    measured = [r for r in records if r.get("status") == "ok" and r.get("ms")
                and (r["workload"], r["B"], r["dtype"], r["mode"]) == cfg.series_key]
    if measured:
        near = min(measured, key=lambda r: abs(r["T"] - cfg.T))
        ref = planning.Config(near["workload"], near["B"], near["T"], near["dtype"], near["mode"])
        return planning.scaled_prediction(cfg, ref, near["ms"], args.smoke), f"scaled from T={near['T']}"
    return planning.predict_step_s(cfg, args.smoke), "cost model"


def _step_note(cfg: planning.Config, steps: List[Dict]) -> str:
    """The progress bar's note while ``cfg`` runs: its last step's phase, number in that phase and time."""
    phase = steps[-1]["phase"]
    return f"{cfg}: {phase} step {sum(s['phase'] == phase for s in steps)}, {steps[-1]['ms']:.1f} ms"


def _summary_line(rec: Dict, clock: float) -> str:
    head = f"[{clock:6.0f} s] {rec['workload']} B={rec['B']} T={rec['T']} {rec['dtype']} {rec['mode']}:"
    if rec.get("status") != "ok":
        return f"{head} {rec.get('status')} — {rec.get('message', '')[:200]}"
    ratio = f" ({rec['time_ratio']:.2f}×)" if rec.get("time_ratio") else ""
    mem = f" ({rec['mem_ratio']:.2f}×)" if rec.get("mem_ratio") else ""
    return (f"{head} {rec['ms']:.2f} ms{ratio}, {rec.get('peak_gib') or float('nan'):.2f} GiB{mem} "
            f"[{rec.get('steps')} steps, {rec.get('process_s', 0):.1f} s]")


def dry_run(configs: List[planning.Config], args) -> None:
    clock, compiled = planning.SERVER_START_S if args.device != "cpu" else 8.0, set()
    budget = args.max_minutes * 60 if args.max_minutes else None
    lines, width = [], max(42, *(len(str(cfg)) for cfg in configs))
    print(f"{'#':>3}  {'configuration':<{width}} {'step ms':>9} {'config s':>9} {'cumul s':>9}  note")
    for i, cfg in enumerate(configs, 1):
        step_s = planning.predict_step_s(cfg, args.smoke)
        total = planning.predict_config_s(cfg, steps=args.steps, warmup=args.warmup, min_timed_s=args.min_timed_s,
                                          max_steps=args.max_steps, device=args.device, smoke=args.smoke)
        if is_flashnorm(cfg.mode) and (cfg.workload, cfg.dtype) not in compiled:
            compiled.add((cfg.workload, cfg.dtype))
            total += planning.TRITON_COMPILE_S if args.device != "cpu" else 0
        note = ""
        if total > 3 * args.timeout and not args.no_predict_skip:
            note, total = "predicted timeout (not run)", 0.0
        elif total > args.timeout:
            note, total = "may time out", args.timeout
        clock += total
        if budget is not None and clock > budget:
            note += " over budget"
        lines.append((i, note))
        print(f"{i:>3}  {str(cfg):<{width}} {step_s * 1e3:>9.1f} {total:>9.1f} {clock:>9.1f}  {note}")
    fits = sum(1 for line in lines if "over budget" not in line[1])
    print(f"{len(configs)} configurations; predicted {clock / 60:.1f} min without a budget" +
          (f"; {fits} start within the {args.max_minutes} min budget, the rest would be recorded as not_run "
           "(--resume in a later run picks them up)" if budget else ""))


def _run_plan(ctx, configs: List[planning.Config], args, meta: Dict, records: List[Dict], write) -> int:
    """Runs (or records as skipped) every configuration of ``configs`` into ``records``, calling ``write()``
    after each; 130 when interrupted (what did not run is recorded as ``not_run``), else 0."""
    t_start = time.monotonic()
    budget = args.max_minutes * 60.0 if args.max_minutes else None
    compiled = set()
    # The bar goes to stderr and only on a terminal; the per-configuration lines go through tqdm.write.
    bar = tqdm(configs, unit="config", file=sys.stderr, disable=None, dynamic_ncols=True, leave=False)
    try:
        for cfg in bar:
            bar.set_postfix_str(str(cfg))
            elapsed = time.monotonic() - t_start
            record = None
            cuda_full = args.device != "cpu" and not args.smoke
            if cuda_full:
                failed = [r for r in records if r.get("status") == "timeout" and not r.get("predicted")
                          and r.get("limit_s", 0) >= args.timeout
                          and (r["workload"], r["B"], r["dtype"], r["mode"]) == cfg.series_key and r["T"] < cfg.T]
                step_s, basis = _prediction(cfg, records, args)
                total = planning.predict_config_s(cfg, steps=args.steps, warmup=args.warmup,
                                                  min_timed_s=args.min_timed_s, max_steps=args.max_steps,
                                                  device=args.device, step_s=step_s)
                if is_flashnorm(cfg.mode) and (cfg.workload, cfg.dtype) not in compiled:
                    total += planning.TRITON_COMPILE_S
                margin = 1.25 if basis != "cost model" else 3.0
                if failed and not args.no_predict_skip:
                    record = _skip_record(cfg, "timeout", f"not run: the same mode timed out at T={failed[0]['T']} "
                                          f"(limit {args.timeout:.0f} s), and longer sequences take longer", None)
                elif total > margin * args.timeout and not args.no_predict_skip:
                    record = _skip_record(cfg, "timeout", (
                        f"not run: predicted ≈{step_s:.1f} s per step ({basis}), ≈{total:.0f} s in all, over the "
                        f"{args.timeout:.0f} s limit; --no-predict-skip runs it"), total)
                elif budget is not None and min(total, args.timeout) > budget - elapsed:
                    record = _skip_record(cfg, "not_run", (
                        f"not run: {max(0.0, budget - elapsed):.0f} s of the {args.max_minutes} min budget left, "
                        f"predicted ≈{min(total, args.timeout):.0f} s"), total)
            elif budget is not None and elapsed >= budget:
                record = _skip_record(cfg, "not_run", f"not run: the {args.max_minutes} min budget is spent", None)
            if record is None:
                limit = args.timeout if budget is None else max(1.0, min(args.timeout, budget - elapsed))
                child_cfg = dict(cfg.as_dict(), device=args.device, smoke=args.smoke, steps=args.steps,
                                 warmup=args.warmup, min_timed_s=args.min_timed_s, max_steps=args.max_steps)
                record = launch(ctx, child_cfg, limit,
                                lambda steps, cfg=cfg: bar.set_postfix_str(_step_note(cfg, steps), refresh=True))
                record["limit_s"] = round(limit, 1)
                if record.get("status") == "timeout" and limit < args.timeout:
                    record["message"] += f" (limit cut to the budget left: {limit:.0f} s)"
                if is_flashnorm(cfg.mode):
                    compiled.add((cfg.workload, cfg.dtype))
                if record.get("gpu") and meta["gpu"] not in (None, record["gpu"]):
                    tqdm.write(f"warning: this run's GPU ({record['gpu']}) differs from the earlier runs' "
                               f"({meta['gpu']})", file=sys.stderr)
                if record.get("gpu"):
                    meta["gpu"] = record["gpu"]
            record["run_date"] = meta["date"]
            records.append(record)
            meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
            write()
            if not args.quiet:
                tqdm.write(_summary_line(record, time.monotonic() - t_start), file=sys.stdout)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured", file=sys.stderr)
        done = {(r["workload"], r["B"], r["T"], r["dtype"], r["mode"]) for r in records}
        for cfg in configs:
            if (cfg.workload, cfg.B, cfg.T, cfg.dtype, cfg.mode) not in done:
                records.append(_skip_record(cfg, "not_run", "not run: interrupted", None))
        write()
        return 130
    finally:
        bar.close()
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["complete"] = True
    write()
    return 0


def run(args, argv: Sequence[str]) -> int:
    configs = make_plan(args)
    if not configs:
        print("Nothing to run: the filters leave no configuration.", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(configs, args)
        return 0
    meta = run_metadata(args, argv)
    records: List[Dict] = []
    if args.resume:
        records, configs, earlier = resume_state(args.out, configs)
        meta["earlier_runs"] = earlier
        gpus = {m.get("gpu") for m in earlier if m.get("gpu")}
        if gpus:
            meta["gpu"] = sorted(gpus)[0]
        print(f"--resume: keeping {len(records)} records of {args.out}; {len(configs)} configurations to run",
              flush=True)
        if not configs:
            return 0
    elif not args.smoke:
        history.archive(args.out, (args.suite or "custom") + ("_repeats" if args.repeat > 1 else ""))
    t_server = time.monotonic()
    ctx = _context(configs)
    meta["server_start_s"] = round(time.monotonic() - t_server, 2)
    print(f"{len(configs)} configurations on {args.device}" + (f", {args.repeat} times" if args.repeat > 1 else "")
          + f"; results → {args.out}", flush=True)
    runs: List[Dict] = []
    for repeat in range(1, args.repeat + 1):
        if repeat > 1:
            meta, records = run_metadata(args, argv), []
        if args.repeat > 1:
            meta["repeat"] = repeat
        code = _run_plan(ctx, configs, args, meta, records,
                         lambda: write_results(args.out, meta, records, runs))
        if code:
            return code
        runs.append({"meta": meta, "records": records})
    counts: Dict[str, int] = {}
    for r in (r for done in runs for r in done["records"]):
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    elapsed = sum(done["meta"]["elapsed_s"] for done in runs)
    print(f"done in {elapsed:.0f} s: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    with contextlib.suppress(Exception):
        from .report import format_tables

        print(format_tables(runs[0]))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_settings(build_parser().parse_args(argv))
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
