"""Activation checkpointing keeps its memory saving under FlashNorm: Hugging Face GPT-2 small with tied
embeddings, B = 1, T = 16384, bf16 autocast, checkpointing of both flavours. flash_fuse's peak memory is at most
1.05× that of the non-DP step with the same checkpointing.

Measured by the benchmark runner itself (each configuration in its own process, peak of
``torch.cuda.max_memory_allocated`` over timed steps), so the figure is the one the benchmark reports.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEMORY_RATIO_LIMIT = 1.05


@pytest.mark.parametrize("workload", ["hf_gpt2_tied_ckpt", "hf_gpt2_tied_ckpt_reentrant"])
def test_flash_fuse_peak_memory_with_checkpointing_at_t16384(workload, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "memory.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--workloads", workload, "--dtypes", "bf16", "--shapes", "1x16384",
         "--modes", "nondp,flash_fuse", "--steps", "2", "--warmup", "1", "--min-timed-s", "0", "--timeout", "120",
         "--quiet", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r["mode"]: r for r in json.loads(out.read_text())["records"]}
    for mode in ("nondp", "flash_fuse"):
        assert records[mode]["status"] == "ok", records[mode]
    nondp, dp = records["nondp"]["peak_gib"], records["flash_fuse"]["peak_gib"]
    assert dp <= MEMORY_RATIO_LIMIT * nondp, f"flash_fuse peak {dp:.3f} GiB > {MEMORY_RATIO_LIMIT} × non-DP {nondp:.3f} GiB"
