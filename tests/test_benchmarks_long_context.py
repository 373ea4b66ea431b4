"""Smoke test of the long-context benchmark (benchmarks/long_context.py): its CLI on tiny CPU models, one process per
configuration, every record written with its status (the Opacus hooks mode fails under HF checkpointing, Liger
needs CUDA: both are recorded, not skipped)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"model", "T", "B", "mode", "status", "step_ms", "peak_gib", "gpu"}


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the CPU run takes FlashNorm's PyTorch backend
    return subprocess.run([sys.executable, "-m", "benchmarks.long_context", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_smoke_run_records_every_configuration(tmp_path):
    out = tmp_path / "long_context.json"
    proc = _run("--smoke", "--device", "cpu", "--models", "gpt2", "--modes", "flashnorm_fused,hf,liger,opacus_hooks",
                "--warmup", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] and "benchmarks.long_context" in data["meta"]["command"]
    records = {r["mode"]: r for r in data["records"]}
    assert set(records) == {"flashnorm_fused", "hf", "liger", "opacus_hooks"}
    for record in records.values():
        assert KEYS <= set(record) and record["model"] == "gpt2" and record["T"] == 64 and record["B"] == 1
        assert record["status"] == "ok" or record["status"] == "oom" or record["status"].startswith("error: ")
    for mode in ("flashnorm_fused", "hf"):
        assert records[mode]["status"] == "ok" and records[mode]["step_ms"] > 0 and records[mode]["peak_gib"] > 0
        assert len(records[mode]["steps_ms"]) >= 3
    # B = 1 after B = 1, the model called with keywords: the DP step's timed steps take the one-sample path
    assert records["flashnorm_fused"]["one_sample_path"] is True and "one_sample_path" not in records["hf"]
    from benchmarks.long_context import format_table

    assert "the DP step took the one-sample path" in format_table(data)

    # --merge keeps the file's other records and replaces the configuration run again
    proc = _run("--smoke", "--device", "cpu", "--models", "gpt2", "--modes", "hf", "--warmup", "1", "--merge",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(out.read_text())["records"]
    assert sorted(r["mode"] for r in merged) == sorted(records)


def test_the_readme_table_is_generated_from_the_committed_results(tmp_path):
    """README.md's long-context table is `format_table` of benchmarks/results/long_context.json; ``--readme`` rewrites
    only the region between its markers."""
    from benchmarks.long_context import TABLE_END, TABLE_START, format_table

    results = os.path.join(ROOT, "benchmarks", "results", "long_context.json")
    with open(results) as fh:
        table = format_table(json.load(fh))
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    assert readme.split(TABLE_START)[1].split(TABLE_END)[0].strip() == table.strip()
    assert "| Llama-3.2-1B shape | 65,536 |" in table and "**OOM**" in table
    page = tmp_path / "page.md"
    page.write_text(f"before\n{TABLE_START}\nold\n{TABLE_END}\nafter\n")
    assert _run("--out", results, "--readme", str(page)).returncode == 0
    assert page.read_text() == f"before\n{TABLE_START}\n{table.rstrip()}\n{TABLE_END}\nafter\n"
