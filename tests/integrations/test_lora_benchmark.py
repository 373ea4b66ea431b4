"""Smoke test of the DP LoRA benchmark (``python -m benchmarks.lora --device cpu --smoke``): a tiny Llama under
PEFT LoRA in non-DP, FlashNorm flash_fuse and Opacus hooks, repeated, written as JSON with ratios to non-DP."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lora_benchmark_smoke_run(tmp_path):
    out = tmp_path / "lora.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the CPU path uses FlashNorm's PyTorch backend
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lora", "--device", "cpu", "--smoke", "--repeat", "2", "--steps", "2",
         "--warmup", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "found in sys.modules" not in proc.stderr
    data = json.loads(out.read_text())
    meta, records = data["meta"], data["records"]
    assert meta["complete"] and meta["device"] == "cpu" and "--smoke" in meta["command"]
    assert meta["settings"]["lora"]["r"] == 16 and meta["versions"]["peft"] and meta["versions"]["opacus"]
    assert [r["mode"] for r in records] == ["nondp", "flash_fuse", "opacus_hooks"]
    for r in records:
        assert r["status"] == "ok", r
        assert r["workload"] == "hf_llama1b_lora" and (r["B"], r["T"]) == (2, 32) and r["repeats"] == 2
        assert len(r["runs_ms"]) == 2 and r["ms"] == pytest.approx(sum(r["runs_ms"]) / 2, abs=1e-3)  # median of two
        assert r["ms"] > 0 and r["peak_gib"] > 0 and r["time_ratio"] > 0 and r["mem_ratio"] > 0
    assert records[0]["time_ratio"] == 1.0 and records[0]["mem_ratio"] == 1.0
    assert isinstance(records[1]["plan"], dict) and records[1]["plan"]  # FlashNorm's norm methods of the LoRA layers
