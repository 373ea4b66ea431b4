"""Smoke test of the end-to-end benchmark: the runner's CLI on tiny CPU models, then the report.

Runs ``python -m benchmarks.run --device cpu --smoke`` for the linear and GPT-2 workloads in every
mode (FlashNorm's and the Opacus peers) in forked processes, checks the JSON records, and renders the
README table and the plots from it into a temporary folder (the repository's README is never touched);
then the ``tied_models`` suite's plan (Hugging Face models with tied embeddings, with checkpointing) at
tiny shapes.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.harness import MODES, is_flashnorm, ratio_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the runner's CPU path uses FlashNorm's PyTorch backend
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = _python("-m", "benchmarks.run", "--device", "cpu", "--smoke", "--workloads", "linear,gpt2",
                   "--steps", "2", "--warmup", "1", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as fh:
        return out, json.load(fh)


def test_runner_records(smoke_results):
    _, data = smoke_results
    records = data["records"]
    meta = data["meta"]
    assert meta["complete"] and meta["device"] == "cpu" and "--smoke" in meta["command"]
    assert meta["versions"]["torch"] and meta["versions"]["opacus"]
    assert {(r["workload"], r["mode"]) for r in records} == {(w, m) for w in ("linear", "gpt2") for m in MODES}
    for r in records:
        assert r["status"] == "ok", r
        for key in ("workload", "B", "T", "dtype", "mode", "ms", "peak_gib", "time_ratio", "mem_ratio", "message"):
            assert key in r, (key, r)
        assert r["ms"] > 0 and r["steps"] >= 2 and r["peak_gib"] > 0
        assert 0.0 < r["time_ratio"] < 1e3 and 0.5 < r["mem_ratio"] < 10.0, r
        if r["mode"] == ratio_base(r["mode"]):  # nondp, nondp_graphed
            assert r["time_ratio"] == 1.0 and r["mem_ratio"] == 1.0
        if is_flashnorm(r["mode"]):
            assert isinstance(r["plan"], dict), r  # FlashNorm's per-layer norm methods (as the planner logs them)


def test_report_table_and_plots(smoke_results, tmp_path):
    results, data = smoke_results
    readme, docs = tmp_path / "README.md", tmp_path / "performance.md"
    for path in (readme, docs):
        path.write_text("# Title\n\nbefore\n<!-- benchmark-table:start -->\nold table\n"
                        "<!-- benchmark-table:end -->\nafter\n")
    proc = _python("-m", "benchmarks.report", "--results", str(results), "--readme", str(readme), "--docs", str(docs),
                   "--plots-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path in (readme, docs):
        text = path.read_text()
        assert text.startswith("# Title\n\nbefore\n<!-- benchmark-table:start -->\n")
        assert text.endswith("<!-- benchmark-table:end -->\nafter\n") and "old table" not in text
        assert "| linear | fp32 | 2 | 64 |" in text and "| gpt2 | fp32 | 2 | 32 |" in text
        assert "FlashNorm flash_fuse" in text and "Opacus ghost" in text
    # The README gets the ratios (time · memory), the docs the step times and peak memory with their ratios.
    summary, full = readme.read_text(), docs.read_text()
    assert "×)" not in summary and "× · " in summary and "Peak memory" not in summary
    assert "×)" in full and "**Median step time**" in full and "**Peak memory**" in full
    assert "--out" not in summary + full, "the output path of the machine that ran is not shown"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["smoke_gpt2_fp32.png", "smoke_linear_fp32.png"]

    # Without the markers: the table is printed, the file is left alone, the exit status says so.
    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    proc = _python("-m", "benchmarks.report", "--results", str(results), "--readme", str(bare), "--docs", str(docs),
                   "--no-plots")
    assert proc.returncode == 2 and "benchmark-table:start" in proc.stderr and "| linear |" in proc.stdout
    assert bare.read_text() == "# no markers\n"


def test_ratio_table_has_one_cell_per_mode():
    from benchmarks.report import format_ratio_table

    base = dict(workload="gpt2", B=1, T=4096, dtype="bf16", message="", status="ok")
    records = [dict(base, mode="nondp", ms=30.0, peak_gib=4.0, time_ratio=1.0, mem_ratio=1.0),
               dict(base, mode="flash_fuse", ms=33.0, peak_gib=4.1, time_ratio=1.1, mem_ratio=1.025),
               dict(base, mode="opacus_ghost", status="oom"),
               dict(base, mode="nondp_graphed", ms=20.0, peak_gib=5.0, time_ratio=1.0, mem_ratio=1.0),
               dict(base, mode="flash_fuse_graphed", ms=21.0, peak_gib=4.0, time_ratio=1.05, mem_ratio=0.8)]
    header, _, row = format_ratio_table({"records": records}).splitlines()
    assert "non-DP, CUDA graphs" not in header, "the graphed base is the graphed ratios' denominator, not a column"
    assert row == "| gpt2 | bf16 | 1 | 4096 | 30.0 ms, 4.00 GiB | 1.10× · 1.02× | **OOM** | 1.05× · 0.80× |"
    # A configuration measured again shows the median time ratio of all its runs, marked.
    repeated = {("gpt2", "bf16", 1, 4096, "flash_fuse"): [1.1, 0.9, 1.0]}
    row = format_ratio_table({"records": records}, repeated).splitlines()[2]
    assert "| 1.00×† · 1.02× |" in row and "| 1.05× · 0.80× |" in row


def test_repeated_run_is_one_file_of_runs_that_the_report_reads(tmp_path):
    """``--repeat 2`` writes ``{"runs": [...]}``; the report finds it as ``<stem>_repeats.json`` beside the results."""
    out = tmp_path / "e2e_repeats.json"
    proc = _python("-m", "benchmarks.run", "--device", "cpu", "--smoke", "--workloads", "linear",
                   "--modes", "nondp,flash_fuse", "--steps", "1", "--warmup", "1", "--repeat", "2", "--quiet",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [run["meta"]["repeat"] for run in runs] == [1, 2] and all(run["meta"]["complete"] for run in runs)
    assert all({r["mode"] for r in run["records"]} == {"nondp", "flash_fuse"} for run in runs)
    from benchmarks import history

    assert history.is_smoke({"runs": runs}) and not history.archive(str(out), "custom_repeats")
    (tmp_path / "e2e.json").write_text(json.dumps(runs[0]))
    proc = _python("-m", "benchmarks.report", "--results", str(tmp_path / "e2e.json"), "--no-readme", "--no-plots")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| linear | fp32 | 2 | 64 | FlashNorm"))
    ratios = [r["time_ratio"] for run in (runs[0], *runs) for r in run["records"] if r["mode"] == "flash_fuse"]
    assert row.split(" | ")[5] == ", ".join(f"{v:.2f}" for v in ratios)
    assert "×† · " in proc.stdout, "the README table shows the repeated configuration's median"


def test_failures_are_rendered(tmp_path):
    from benchmarks.report import format_tables

    base = dict(workload="gpt2", B=1, T=4096, dtype="bf16", message="")
    records = [
        dict(base, mode="nondp", status="ok", ms=30.0, peak_gib=4.0, time_ratio=1.0, mem_ratio=1.0),
        dict(base, mode="flash_fuse", status="ok", ms=33.0, peak_gib=4.1, time_ratio=1.1, mem_ratio=1.025),
        dict(base, mode="opacus_ghost", status="oom", message="CUDA out of memory"),
        dict(base, mode="ghost", status="timeout", predicted=True),
        dict(base, mode="flash", status="not_run"),
    ]
    table = format_tables({"meta": {"device": "cuda", "gpu": "H200"}, "records": records})
    row = next(line for line in table.splitlines() if line.startswith("| gpt2 | bf16 | 1 | 4096 |"))
    assert "30.0 ms" in row and "33.0 ms (1.10×)" in row and "**OOM**" in row and "**timeout***" in row
    assert "not run" in row


def test_repeated_configurations_get_every_ratio_and_their_median():
    from benchmarks.report import format_repeats

    def run(ratio, commit, with_ghost=True):
        base = dict(workload="gpt2", B=8, T=1024, dtype="bf16", status="ok", ms=40.0, peak_gib=7.0)
        records = [dict(base, mode="nondp", time_ratio=1.0), dict(base, mode="flash_fuse", time_ratio=ratio)]
        if with_ghost:
            records.append(dict(base, mode="ghost", time_ratio=2.0))
        return {"meta": {"git": {"commit": commit}}, "records": records}

    main = run(1.34, "aaa")
    table = format_repeats(main, [run(1.20, "bbb"), run(1.24, "bbb", with_ghost=False)])
    row = next(line for line in table.splitlines() if "flash_fuse" in line)
    assert row == "| gpt2 | bf16 | 8 | 1024 | FlashNorm flash_fuse | 1.34, 1.20, 1.24 | 1.24× |"
    assert "ghost" not in table.replace("flash_fuse", ""), "a mode missing from one repeat is not summarised"
    assert "| non-DP |" not in table and "Repeats: commit bbb." in table
    assert format_repeats(main, []) == ""


def test_graphed_modes_take_their_ratios_to_graphed_non_dp():
    from benchmarks.run import add_ratios

    base = dict(workload="gpt2", B=1, T=4096, dtype="bf16", status="ok", peak_gib=4.0)
    records = [dict(base, mode="nondp", ms=30.0), dict(base, mode="flash_fuse", ms=33.0),
               dict(base, mode="nondp_graphed", ms=20.0, peak_gib=5.0), dict(base, mode="flash_fuse_graphed", ms=21.0)]
    add_ratios(records)
    ratios = {r["mode"]: (r["time_ratio"], r["mem_ratio"]) for r in records}
    assert ratios == {"nondp": (1.0, 1.0), "flash_fuse": (1.1, 1.0), "nondp_graphed": (1.0, 1.0),
                      "flash_fuse_graphed": (1.05, 0.8)}


def test_end_to_end_suite_graphs_only_its_short_gpt_groups():
    from benchmarks import plan

    configs = plan.suite_configs("end_to_end", ["gpt2", "linear", "llama1b"], ["fp32", "bf16"], MODES)
    graphed = {(c.workload, c.dtype, c.B, c.T) for c in configs if c.mode.endswith("_graphed")}
    assert graphed == plan.GRAPHED_GROUPS["end_to_end"]
    eager = {(c.workload, c.dtype, c.B, c.T) for c in configs if c.mode == "flash_fuse"}
    assert eager == set(plan.END_TO_END_GROUPS)


TIED_SUITE_MODES = ("nondp", "flash_fuse", "flash", "opacus_hooks")
#: The tied_models suite's plan on the GPU: (workload, B, T) → modes, all bf16.
TIED_SUITE = {("hf_gpt2_tied", 8, 1024): TIED_SUITE_MODES, ("hf_gpt2_tied", 1, 4096): TIED_SUITE_MODES,
              ("hf_llama1b_tied", 2, 4096): TIED_SUITE_MODES,
              ("hf_gpt2_tied_ckpt", 1, 16384): ("nondp", "flash_fuse"),
              ("hf_gpt2_tied_ckpt_reentrant", 1, 16384): ("nondp", "flash_fuse")}


@pytest.fixture(scope="module")
def tied_smoke_results(tmp_path_factory):
    """``--smoke --suite tied_models``: the suite's plan on tiny Hugging Face models, one timed step each."""
    out = tmp_path_factory.mktemp("bench") / "tied.json"
    proc = _python("-m", "benchmarks.run", "--device", "cpu", "--smoke", "--suite", "tied_models", "--steps", "1",
                   "--warmup", "1", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["records"]


def test_tied_models_suite_plan():
    """The GPU plan is exactly the suite's configurations, in order, and its predicted time fits in 3 minutes."""
    from benchmarks import plan
    from benchmarks.models import WORKLOADS
    from benchmarks.run import build_parser, resolve_settings

    args = resolve_settings(build_parser().parse_args(["--suite", "tied_models", "--device", "cuda", "--dry-run"]))
    assert args.modes == list(TIED_SUITE_MODES) and args.max_minutes <= 3.0
    configs = plan.suite_configs("tied_models", list(WORKLOADS), list(args.dtypes), args.modes)
    assert [(c.workload, c.B, c.T, c.mode) for c in configs] == [
        (*group, m) for group, modes in TIED_SUITE.items() for m in modes]
    assert {c.dtype for c in configs} == {"bf16"}
    predicted = plan.SERVER_START_S + sum(
        plan.predict_config_s(c, steps=args.steps, warmup=args.warmup, min_timed_s=args.min_timed_s,
                              max_steps=args.max_steps) for c in configs)
    predicted += plan.TRITON_COMPILE_S * len({c.workload for c in configs})
    assert predicted < 0.75 * 180, predicted

    local = resolve_settings(build_parser().parse_args(["--suite", "tied_models", "--device", "cpu"]))
    assert local.out == os.path.join("benchmarks", "results", "e2e_tied_models_cpu.json"), "not end_to_end's file"
    assert sorted(local.workloads) == sorted({w for w, _, _ in TIED_SUITE})


def test_tied_models_smoke_runs_the_suites_plan(tied_smoke_results):
    smoke_groups = {}  # at the smoke shape the two GPT-2 groups are one
    for (workload, _, _), modes in TIED_SUITE.items():
        smoke_groups.setdefault(workload, modes)
    assert [(r["workload"], r["mode"]) for r in tied_smoke_results] == [
        (w, m) for w, modes in smoke_groups.items() for m in modes]


@pytest.mark.parametrize("workload", [
    "hf_gpt2_tied", "hf_llama1b_tied", "hf_gpt2_tied_ckpt_reentrant",
    "hf_gpt2_tied_ckpt",
])
def test_tied_model_steps_in_every_mode_of_the_suite(tied_smoke_results, workload):
    """Each tiny Hugging Face model (weights tied, positions given) takes its steps in every mode of the suite."""
    records = [r for r in tied_smoke_results if r["workload"] == workload]
    assert records
    for r in records:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["steps"] >= 1 and r["time_ratio"] > 0
        if is_flashnorm(r["mode"]):
            assert isinstance(r["plan"], dict), r


def test_resume_keeps_complete_groups(smoke_results, tmp_path):
    results, data = smoke_results
    # Mark one group incomplete: --resume must plan exactly that group again, whole.
    records = [dict(r) for r in data["records"]]
    for r in records:
        if r["workload"] == "gpt2" and r["mode"] == "flash":
            r.update(status="not_run")
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"meta": data["meta"], "records": records}))

    from benchmarks import plan
    from benchmarks.run import resume_state

    configs = plan.grid_configs(["linear", "gpt2"], ["fp32"], MODES, smoke=True)
    kept, todo, earlier = resume_state(str(path), configs)
    assert {(c.workload, c.mode) for c in todo} == {("gpt2", m) for m in MODES}
    assert {r["workload"] for r in kept} == {"linear"} and len(kept) == len(MODES)
    assert earlier and earlier[-1]["command"] == data["meta"]["command"]


def test_results_record_the_commit_given_for_a_copied_tree(monkeypatch):
    """A tree copied to another machine carries stale git metadata: FLASHNORM_GIT_COMMIT names the real commit."""
    from benchmarks.history import git_commit

    monkeypatch.setenv("FLASHNORM_GIT_COMMIT", "abc1234")
    assert git_commit() == {"commit": "abc1234", "dirty": None, "source": "FLASHNORM_GIT_COMMIT"}
    monkeypatch.delenv("FLASHNORM_GIT_COMMIT")
    assert git_commit().get("source") is None


def test_overwriting_a_result_moves_it_to_the_history(tmp_path):
    """The latest run keeps the stable name; the run it replaces becomes one line of history.jsonl, whole."""
    from benchmarks import history

    assert history.stable_path("e2e", "NVIDIA H200") == os.path.join("benchmarks", "results", "e2e_h200.json")
    assert history.gpu_tag("NVIDIA A100-SXM4-80GB") == "a100" and history.gpu_tag(None) == "cpu"

    def run(commit, ms, smoke=False):
        meta = {"command": "python -m benchmarks.run --suite end_to_end", "date": f"2026-12-0{ms}T00:00:00+00:00",
                "gpu": "NVIDIA H200", "git": {"commit": commit}, "settings": {"smoke": smoke}}
        return {"meta": meta, "records": [dict(workload="gpt2", B=1, T=16, dtype="bf16", mode="nondp", ms=float(ms),
                                               gpu="NVIDIA H200", run_date=meta["date"])]}

    path = str(tmp_path / "e2e_h200.json")
    history.save_json(path, run("aaa", 1), suite="end_to_end")
    assert not (tmp_path / "history.jsonl").exists(), "nothing was there to archive"
    history.save_json(path, run("bbb", 2), suite="end_to_end")
    history.save_json(path, run("bbb", 2), suite="end_to_end")  # the same run again: it replaces nothing
    (line,) = history.read_history(str(tmp_path / "history.jsonl"))
    assert {k: line[k] for k in history.COLUMNS} == {
        "suite": "end_to_end", "kind": "results", "file": "e2e_h200.json", "commit": "aaa",
        "date": "2026-12-01T00:00:00+00:00", "gpu": "NVIDIA H200", "command": "python -m benchmarks.run --suite end_to_end"}
    assert line["records"] == [dict(workload="gpt2", B=1, T=16, dtype="bf16", mode="nondp", ms=1.0)]
    assert json.loads(open(path).read())["meta"]["git"]["commit"] == "bbb"

    smoke = str(tmp_path / "smoke.json")
    history.save_json(smoke, run("ccc", 3, smoke=True), suite="end_to_end")
    history.save_json(smoke, run("ddd", 4, smoke=True), suite="end_to_end")
    assert len(history.read_history(str(tmp_path / "history.jsonl"))) == 1, "smoke runs measure nothing"


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda_graphs"])
def test_overhead_benchmark_reports_every_category(tmp_path, graphs):
    """``python -m benchmarks.overhead`` on a tiny GPT-2: step times, the breakdown of both steps and the
    FlashNorm CPU figure (``--cuda-graphs`` runs eagerly on the CPU, through the same step object); eager,
    also the profiler's split of CPU time by the same categories."""
    out = tmp_path / "overhead.json"
    args = ["-m", "benchmarks.overhead", "--device", "cpu", "--smoke", "--batch", "2", "--steps", "2", "--warmup", "1",
            "--json", str(out)] + (["--cuda-graphs"] if graphs else ["--profile"])
    proc = _python(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as fh:
        data = json.load(fh)
    assert data["meta"]["cuda_graphs"] is graphs and data["meta"]["git"]["commit"]
    (result,) = data["results"]
    assert set(result["step_ms"]) == {"nondp", "flash_fuse"} and all(v > 0 for v in result["step_ms"].values())
    dp = result["breakdown_ms"]["flash_fuse"]
    assert dp["hooks_forward"] > 0 and dp["hooks_backward"] > 0 and dp["norms"] > 0  # the eager path ran the hooks
    assert ("graph" in dp) is graphs
    assert 0 < result["flashnorm_cpu_ms"] < dp["total"]
    assert "FlashNorm hooks + bookkeeping, CPU" in proc.stdout
    if not graphs:  # every FlashNorm category the eager step passes through got CPU time in the profile
        profiled = proc.stdout.split("torch.profiler, ")[1]
        for label in ("FlashNorm forward hooks", "FlashNorm backward hooks", "FlashNorm norm kernels"):
            line = next(line for line in profiled.splitlines() if line.strip().startswith(label))
            assert float(line.split("ms/step")[0].split()[-1]) > 0, line


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_tail_benchmark_runs_on_cpu(tmp_path, capsys):
    """``python -m benchmarks.tail --device cpu --smoke``: both tails, each backend that runs here, a JSON record."""
    import torch

    from benchmarks import tail

    out = tmp_path / "tail.json"
    assert tail.main(["--device", "cpu", "--smoke", "--reps", "1", "--trials", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["results"]) == {f"{name} / {backend}" for name in ("clip", "noise fused", "noise unfused")
                                      for backend in tail.backends(torch.device("cpu"))}
    assert all(r["host_ms_min"] > 0 for r in record["results"].values())
    assert "host" in capsys.readouterr().out


def test_progress_note_counts_the_steps_of_the_current_phase():
    from benchmarks.plan import Config
    from benchmarks.run import _step_note

    steps = [{"phase": "warmup", "ms": 30.0}, {"phase": "warmup", "ms": 9.0}, {"phase": "timed", "ms": 8.04}]
    assert _step_note(Config("gpt2", 8, 1024, "bf16", "flash_fuse"), steps) == \
        "gpt2 B=8 T=1024 bf16 flash_fuse: timed step 1, 8.0 ms"


def test_profile_families_put_every_flashnorm_kernel_in_its_own_family():
    import importlib
    import pkgutil

    import flashnorm.kernels
    from benchmarks.profile_step import family

    kernels = set()
    for info in pkgutil.iter_modules(flashnorm.kernels.__path__):
        module = importlib.import_module(f"flashnorm.kernels.{info.name}")
        jitted = (getattr(v, "fn", None) for v in vars(module).values() if type(v).__name__.endswith("Function"))
        kernels |= {fn.__name__ for fn in jitted if callable(fn) and fn.__name__.endswith("_kernel")}
    assert len(kernels) >= 9, kernels  # the norms, clipped gradients, affine norms, multi-tensor tail, copies
    assert {name: family(name) for name in kernels} == {name: "flashnorm triton" for name in kernels}
    assert family("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT") == "gemm"
    assert family("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>") == "elementwise"
    assert family("void at::native::reduce_kernel<512, 1>") == "reduce (norm, sum, softmax)"


def test_flop_floor_from_the_shapes():
    from benchmarks import floor

    one = floor.Shape("one Linear", 0, (), 64, 128, False)  # the head alone: (d, p) = (64, 128)
    b, t = 4, 16
    gram, flash = 2 * b * t**2 * (128 + 64), 2 * b * t * 128 * 64
    plain = 6 * b * t * 128 * 64  # no blocks, no attention
    assert floor.floor(floor.Row(one, b, t)) == pytest.approx((plain + min(gram, flash)) / plain)
    assert floor.floor(floor.Row(one, 1, t)) == 1.0  # B = 1: the ordinary gradient, scaled
    llama = next(r for r in floor.ROWS if r.shape is floor.LLAMA_1B and (r.batch, r.seq) == (8, 1024))
    assert 1.15 < floor.floor(llama) < 1.25  # "a floor of about 1.2×" on that row
    # with the Gram form in float64 beyond 32 positions (the rounding allowance), flash is that row's form
    plain, _ = floor.step_flops(llama)
    flash = sum(2.0 * 8 * 1024 * p * d for _ in range(16) for d, p in floor.LLAMA_1B.linears) + 2.0 * 8 * 1024 * 2048 * 128256
    tied = 4.0 * 8 * 1024**2 * 2048
    assert floor.floor(llama, allowance=True) == pytest.approx((plain + flash + tied) / plain)
    short = floor.Row(one, b, floor.GRAM_FLOAT32_MAX_STEPS)
    assert floor.floor(short, allowance=True) == floor.floor(short)  # float32 Gram allowed up to 32 positions


def test_flop_floor_of_layers_sharing_an_input():
    """Two Linears (64 → 32) of one input share XXᵀ: one Gram form 2·B·T²·(d + p_1 + p_2) instead of two; the flash
    form has no shared term. On the Llama row at B = 8, T = 1024 sharing lowers the float32-Gram floor only: with Gram
    in float64 beyond 32 positions flash is the cheaper form, and the floor stays."""
    from benchmarks import floor

    pair = floor.Shape("two of one input", 1, ((64, 32), (64, 32)), 64, 128, False, ((0, 1),))
    b, t = 4, 16
    row = floor.Row(pair, b, t)
    head = min(2 * b * t**2 * (128 + 64), 2 * b * t * 128 * 64)
    apart = 2 * min(2 * b * t**2 * (32 + 64), 2 * b * t * 32 * 64) + head
    together = min(2 * b * t**2 * (64 + 32 + 32), 2 * b * t * 64 * 64) + head
    assert floor.step_flops(row)[1] == pytest.approx(apart)
    assert floor.step_flops(row, shared=True)[1] == pytest.approx(together)
    assert together < apart
    llama = next(r for r in floor.ROWS if r.shape is floor.LLAMA_1B and (r.batch, r.seq) == (8, 1024))
    assert floor.floor(llama, shared=True) < floor.floor(llama)
    assert floor.floor(llama, allowance=True, shared=True) == pytest.approx(floor.floor(llama, allowance=True))
