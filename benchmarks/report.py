"""Plots, the README table and the performance page's tables from a results JSON of `benchmarks.run`.

    python -m benchmarks.report                 # benchmarks/results/e2e_h200.json → README.md, docs/performance.md

writes ``<stem>_<workload>_<dtype>.png`` (time and memory ratio to non-DP against T, one line per
mode, one row of panels per batch size) next to the results (``--plots-dir`` to change), and
rewrites the region between ``<!-- benchmark-table:start -->`` and ``<!-- benchmark-table:end -->`` of
``--readme`` (one table of ratios to non-DP) and of ``--docs`` (step times and peak memory in full,
and the repeated configurations); ``--no-readme`` prints them and touches neither file. A file without
the markers is left alone and the exit status is 2; nothing outside the markers is touched.

Repeated configurations: ``<stem>_repeats.json`` beside the results, when it exists (``--repeats`` to
name others; a file of ``benchmarks.run --repeat N`` holds N runs), adds a table of the configurations
measured again, each in its own process as in the main run: every run's time ratio and their median
with the main run's. Steps bounded by the host's issue time move by ±10-20 % between processes; the
median is their figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Dict, List, Optional, Sequence

from .harness import MODES, ratio_base

START = "<!-- benchmark-table:start -->"
END = "<!-- benchmark-table:end -->"
MODE_LABELS = {
    "nondp": "non-DP", "flash_fuse": "FlashNorm flash_fuse", "flash": "FlashNorm flash", "ghost": "FlashNorm ghost",
    "opacus_hooks": "Opacus hooks", "opacus_ghost": "Opacus ghost",
    "nondp_graphed": "non-DP, CUDA graphs", "flash_fuse_graphed": "flash_fuse, CUDA graphs",
}
WORKLOAD_ORDER = ("gpt2", "llama1b", "linear")
_FAILED = {"oom": "OOM", "timeout": "timeout", "error": "error", "not_run": "not run"}


def load_runs(path: str) -> List[Dict]:
    """The runs in a results file: ``{"meta", "records"}`` is one, ``{"runs": [...]}`` (``--repeat``) several."""
    with open(path) as fh:
        data = json.load(fh)
    runs = data.get("runs", [data]) if isinstance(data, dict) else [data]
    if not runs or not all(isinstance(run, dict) and "records" in run for run in runs):
        raise ValueError(f"{path}: expected {{'meta': ..., 'records': [...]}} or {{'runs': [...]}} from benchmarks.run")
    return runs


def load(path: str) -> Dict:
    """The one run of a results file."""
    runs = load_runs(path)
    if len(runs) != 1:
        raise ValueError(f"{path}: holds {len(runs)} runs; pass it as --repeats")
    return runs[0]


def _modes_present(records: List[Dict]) -> List[str]:
    present = {r["mode"] for r in records}
    return [m for m in MODES if m in present] + sorted(present - set(MODES))


def _rows(records: List[Dict]):
    keys = {(r["workload"], r["dtype"], r["B"], r["T"]) for r in records}

    def order(k):
        w = WORKLOAD_ORDER.index(k[0]) if k[0] in WORKLOAD_ORDER else len(WORKLOAD_ORDER)
        return (w, k[0], 0 if k[1] == "bf16" else 1, k[2], k[3])

    return sorted(keys, key=order)


def _cell(rec: Optional[Dict], kind: str) -> str:
    if rec is None:
        return "—"
    status = rec.get("status")
    if status != "ok":
        label = _FAILED.get(status, status or "?")
        if status == "timeout" and rec.get("predicted"):
            label += "*"
        seen = rec.get("steps_seen_ms") or {}
        last = (seen.get("timed") or seen.get("warmup") or [None])[-1]
        if status == "timeout" and kind == "time" and last:
            return f"**{label}** (≈{last / 1e3:.1f} s/step)"
        return f"**{label}**" if status in ("oom", "error", "timeout") else label
    if kind == "time":
        value, ratio, unit = rec.get("ms"), rec.get("time_ratio"), " ms"
        text = f"{value:.1f}{unit}" if value is not None and value >= 10 else f"{value:.2f}{unit}"
    else:
        value, ratio = rec.get("peak_gib"), rec.get("mem_ratio")
        text = f"{value:.2f} GiB" if value is not None else "?"
    if rec["mode"] != ratio_base(rec["mode"]) and ratio is not None:
        text += f" ({ratio:.2f}×)"
    return text


def format_table(data: Dict, kind: str = "time") -> str:
    """A markdown table: rows (workload, dtype, B, T); per mode a column ``ms (×ratio)`` or ``GiB (×ratio)``."""
    records = data["records"]
    modes = _modes_present(records)
    index = {(r["workload"], r["dtype"], r["B"], r["T"], r["mode"]): r for r in records}
    head = ["workload", "dtype", "B", "T"] + [MODE_LABELS.get(m, m) for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * len(modes)]
    for w, dtype, b, t in _rows(records):
        cells = [w, dtype, str(b), str(t)] + [_cell(index.get((w, dtype, b, t, m)), kind) for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _times(value: Optional[float]) -> str:
    return "?" if value is None else f"{value:.2f}×"


def _ratio_cell(rec: Optional[Dict], repeated: Optional[List[float]]) -> str:
    if rec is None:
        return "—"
    if rec.get("status") != "ok":
        return _cell(rec, "time")
    time_text = f"{statistics.median(repeated):.2f}×†" if repeated else _times(rec.get("time_ratio"))
    return f"{time_text} · {_times(rec.get('mem_ratio'))}"


def format_ratio_table(data: Dict, repeated: Optional[Dict[tuple, List[float]]] = None) -> str:
    """A markdown table: rows (workload, dtype, B, T); non-DP's step time and peak memory, then per mode
    ``time× · memory×`` (ratios to the non-DP step of the same run; graphed modes to graphed non-DP).
    A configuration in ``repeated`` (`repeated_ratios`) shows the median time ratio of its runs, marked †."""
    repeated = repeated or {}
    records = data["records"]
    modes = [m for m in _modes_present(records) if m == "nondp" or m != ratio_base(m)]
    index = {(r["workload"], r["dtype"], r["B"], r["T"], r["mode"]): r for r in records}
    head = ["workload", "dtype", "B", "T"] + [MODE_LABELS.get(m, m) for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * len(modes)]
    for w, dtype, b, t in _rows(records):
        cells = [w, dtype, str(b), str(t)]
        for m in modes:
            rec = index.get((w, dtype, b, t, m))
            if m == "nondp" and rec is not None and rec.get("status") == "ok":
                cells.append(f"{_cell(rec, 'time')}, {_cell(rec, 'memory')}")
            else:
                cells.append(_ratio_cell(rec, repeated.get((w, dtype, b, t, m))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _command(meta: Dict) -> str:
    """The run's command without ``--out PATH`` (a path on the machine that ran it; the file is named above)."""
    return re.sub(r"\s--out(=|\s+)\S+", "", meta.get("command", ""))


def format_summary(data: Dict, source: Optional[str] = None, repeats: Sequence[Dict] = ()) -> str:
    """The README block: run line, the ratio table, a short legend."""
    meta = data.get("meta", {})
    origin = f" from `{source}`" if source else ""
    out = [f"_Generated by `python -m benchmarks.report`{origin}. {_meta_line(meta)}._", ""]
    out.append("Per mode: **step time × · peak memory ×**, ratios to the non-DP step of the same run "
               "(non-DP column: its median step time and peak memory):")
    out += ["", format_ratio_table(data, repeated_ratios(data, repeats)), ""]
    out.append("fp32 = TF32 off; bf16 = autocast; CUDA graphs = forward, loss and backward replayed by "
               "`flashnorm.CudaGraphStep` (ratios to non-DP with CUDA graphs; memory reserved, the graphs' pool "
               "included). OOM / timeout / error are recorded failures (* = predicted, not run)." + (
                   f" † = median of this run and {len(repeats)} repeats: steps bounded by the CPU move by "
                   "10-20 % between processes." if repeats else ""))
    return "\n".join(out)


def _meta_line(meta: Dict) -> str:
    versions = meta.get("versions", {})
    parts = [f"GPU: {meta.get('gpu') or meta.get('device', '?')}"]
    parts += [f"{k} {versions[k]}" for k in ("torch", "triton", "opacus", "flashnorm") if versions.get(k)]
    if meta.get("date"):
        parts.append(meta["date"][:10])
    commit = (meta.get("git") or {}).get("commit")
    if commit:
        parts.append(f"commit {commit[:10]}" + (" (dirty)" if meta["git"].get("dirty") else ""))
    return ", ".join(parts)


def format_tables(data: Dict, source: Optional[str] = None) -> str:
    """The README block: run line, step-time table, peak-memory table, legend."""
    meta = data.get("meta", {})
    settings = meta.get("settings", {})
    out = []
    origin = f" from `{source}`" if source else ""
    out.append(f"_Generated by `python -m benchmarks.report`{origin}. {_meta_line(meta)}._")
    if meta.get("command"):
        out.append(f"Command: `{_command(meta)}`" + ("" if meta.get("complete", True) else " (incomplete run)"))
    out.append("")
    out.append("**Median step time** (forward, backward, `optimizer.step()`, `zero_grad()`; "
               "ratio to non-DP of the same run):")
    out.append("")
    out.append(format_table(data, "time"))
    out.append("")
    out.append("**Peak memory** (`torch.cuda.max_memory_allocated` over the timed steps; CUDA graphs: "
               "`max_memory_reserved`, the graphs' pool included; ratio to non-DP):"
               if meta.get("device", "cuda") != "cpu" else "**Peak memory** (CPU: process max RSS, rough):")
    out.append("")
    out.append(format_table(data, "memory"))
    out.append("")
    legend = ("fp32 = TF32 off; bf16 = autocast; CUDA graphs = forward, loss and backward replayed by "
              "`flashnorm.CudaGraphStep` (ratio to non-DP with CUDA graphs). OOM / timeout / error are recorded failures "
              f"(per-configuration limit {settings.get('timeout_s', '?')} s; * = predicted from the same mode's "
              "shorter runs or the cost model, not run); not run = the run's time budget was spent.")
    out.append(legend)
    return "\n".join(out)


def repeated_ratios(data: Dict, repeats: Sequence[Dict]) -> Dict[tuple, List[float]]:
    """(workload, dtype, B, T, mode) → the time ratios of the main run and every repeat, for the configurations
    (not the ratio bases) that every repeat measured."""
    keyed = [{(r["workload"], r["dtype"], r["B"], r["T"], r["mode"]): r for r in run["records"]}
             for run in (data, *repeats)]
    keys = [k for k in keyed[1] if k[4] != ratio_base(k[4]) and all(k in run for run in keyed[1:])] if repeats else []
    out = {}
    for key in keys:
        ratios = [run[key]["time_ratio"] for run in keyed if key in run and run[key].get("time_ratio")]
        if ratios:
            out[key] = ratios
    return out


def format_repeats(data: Dict, repeats: Sequence[Dict]) -> str:
    """Time ratios of the configurations that ``repeats`` measured again: one column per run (the main run
    first), and the median of all of them; modes other than the ratio bases only."""
    repeated = repeated_ratios(data, repeats)
    if not repeated:
        return ""
    shapes = _rows([dict(zip(("workload", "dtype", "B", "T"), k[:4])) for k in repeated])
    modes = _modes_present([{"mode": k[4]} for k in repeated])
    out = [f"**Repeated** in {len(repeats)} more runs (one process per configuration each; time ratio to the "
           "non-DP step of the same run; main run first, then the repeats; median of all):", "",
           "| workload | dtype | B | T | mode | ratios | median |", "|---|---|---|---|---|---|---:|"]
    for shape in shapes:
        for mode in modes:
            ratios = repeated.get((*shape, mode))
            if ratios:
                out.append(f"| {' | '.join(map(str, shape))} | {MODE_LABELS.get(mode, mode)} | "
                           f"{', '.join(f'{v:.2f}' for v in ratios)} | {statistics.median(ratios):.2f}× |")
    commits = sorted({((run.get("meta") or {}).get("git") or {}).get("commit") or "?" for run in repeats})
    out += ["", f"Repeats: commit {', '.join(commits)}."]
    return "\n".join(out)


def update_region(path: str, block: str, start_marker: str = START, end_marker: str = END) -> bool:
    """Replaces the text between the markers of ``path``; False when the file or a marker is missing."""
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        text = fh.read()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < 0 or end < start:
        return False
    new = text[: start + len(start_marker)] + "\n" + block.rstrip() + "\n" + text[end:]
    if new != text:
        with open(path, "w") as fh:
            fh.write(new)
    return True


def make_plots(data: Dict, out_dir: str, stem: str) -> List[str]:
    """One PNG per (workload, dtype): time and memory ratio against T, a line per mode, a row per B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["records"]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    markers = dict(zip(MODES, "o s ^ D v P X *".split()))
    groups = sorted({(r["workload"], r["dtype"]) for r in records})
    for workload, dtype in groups:
        recs = [r for r in records if r["workload"] == workload and r["dtype"] == dtype]
        batches = sorted({r["B"] for r in recs})
        fig, axes = plt.subplots(len(batches), 2, figsize=(11, 3.6 * len(batches)), squeeze=False)
        for row, b in enumerate(batches):
            sub = [r for r in recs if r["B"] == b]
            ts = sorted({r["T"] for r in sub})
            panels = (("time_ratio", "step time / non-DP"), ("mem_ratio", "peak memory / non-DP"))
            for col, (key, title) in enumerate(panels):
                ax = axes[row][col]
                plotted = False
                for mode in _modes_present(sub):
                    if mode == ratio_base(mode):
                        continue
                    pts = sorted((r["T"], r[key]) for r in sub if r["mode"] == mode and r.get(key) is not None)
                    fails = sorted((r["T"], r["status"]) for r in sub if r["mode"] == mode and r.get("status") != "ok")
                    label = MODE_LABELS.get(mode, mode)
                    if fails:
                        label += " (" + ", ".join(f"{_FAILED.get(s, s)} T={t}" for t, s in fails[:3]) + ")"
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(mode, "o"), label=label)
                        plotted = True
                    elif fails:
                        ax.plot([], [], marker=markers.get(mode, "o"), linestyle="none", label=label)
                ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
                if plotted:
                    ax.set_xscale("log", base=2)
                if plotted and ts:
                    ax.set_xticks(ts)
                    ax.set_xticklabels([f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t) for t in ts])
                if plotted:  # a panel whose configurations all failed or did not run stays linear
                    ax.set_yscale("log")
                ax.set_xlabel("T (tokens per sequence)")
                ax.set_ylabel(title)
                ax.set_title(f"{workload} {dtype} B={b}: {title}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        meta_line = _meta_line(data.get("meta", {}))
        fig.suptitle(meta_line, fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_{workload}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join("benchmarks", "results", "e2e_h200.json"), help="results JSON")
    p.add_argument("--readme", default="README.md", help="file whose marked region gets the ratio table")
    p.add_argument("--docs", default=os.path.join("docs", "performance.md"),
                   help="file whose marked region gets the full tables")
    p.add_argument("--no-readme", action="store_true", help="print the tables; leave the README and the docs alone")
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default: the results' folder)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--repeats", nargs="*", default=None,
                   help="results JSONs of runs that measured some configurations again (default: <stem>_repeats.json "
                        "beside the results, if it exists)")
    args = p.parse_args(argv)

    data = load(args.results)
    stem = os.path.splitext(os.path.basename(args.results))[0]
    if args.repeats is None:
        beside = os.path.join(os.path.dirname(args.results), f"{stem}_repeats.json")
        args.repeats = [beside] if os.path.exists(beside) else []
    source = os.path.relpath(args.results)
    repeats = [run for path in args.repeats for run in load_runs(path)]
    summary = format_summary(data, source=source, repeats=repeats)
    full = format_tables(data, source=source)
    repeated = format_repeats(data, repeats)
    if repeated:
        full += "\n\n" + repeated
    if not args.no_plots:
        out_dir = args.plots_dir or os.path.dirname(os.path.abspath(args.results))
        for path in make_plots(data, out_dir, stem):
            print(f"wrote {os.path.relpath(path)}")
    if args.no_readme:
        print(summary + "\n\n" + full)
        return 0
    status = 0
    for path, block in ((args.readme, summary), (args.docs, full)):
        if update_region(path, block):
            print(f"updated the benchmark table in {path}")
            continue
        print(block)
        print(f"\nerror: {path} has no region between '{START}' and '{END}' (or does not exist); add both markers "
              "on their own lines where the table belongs, or pass --readme/--docs PATH, or --no-readme.",
              file=sys.stderr)
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
