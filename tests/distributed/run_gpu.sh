#!/usr/bin/env bash
# The 2-GPU checks of the distributed modes, from the repository root of a machine with 2 CUDA GPUs:
#
#   1. tests/distributed with NCCL on 2 GPUs (the CPU suite's cases, fp32 with the tf32 tolerance);
#   2. GPT-2 small (12 x 768, vocab 50257, causal SDPA, untied head; bf16 FSDP2 mixed precision,
#      B=8 x T=1024 per GPU, fixed batches) in flash_fuse_fsdp and without DP, on 1 and on 2 GPUs:
#      median step time, tokens/s, peak memory per GPU -> a table on stdout and $OUT/gpt2_fsdp.json.
#
#   Writes three files to $OUT: tests_distributed_nccl.txt, gpt2_fsdp.json, gpt2_runs.log (the runs' output).
#
#   OUT=/some/dir bash tests/distributed/run_gpu.sh          (OUT defaults to ./out)
#   SKIP_TESTS=1 / SKIP_BENCH=1 skip a part; BATCH, SEQ, STEPS override the GPT-2 run; PYTHON the interpreter.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
BATCH=${BATCH:-8}
SEQ=${SEQ:-1024}
STEPS=${STEPS:-10}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # flashnorm and tests from this checkout
status=0

"$PYTHON" - <<'EOF'
import torch, opacus
print(f"torch {torch.__version__}, opacus {opacus.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
EOF

if [ -z "${SKIP_TESTS:-}" ]; then
  FLASHNORM_DIST_BACKEND=nccl timeout 420 "$PYTHON" -m pytest tests/distributed -q -p no:cacheprovider -rfE 2>&1 \
    | tee "$OUT/tests_distributed_nccl.txt"
  status=${PIPESTATUS[0]}
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  runs=$(mktemp -d)
  for n in 1 2; do
    for mode in nondp flash_fuse_fsdp; do
      echo "=== GPT-2 $mode on $n GPU(s)" >> "$OUT/gpt2_runs.log"
      timeout 300 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$n" examples/fsdp_gpt.py \
        --mode "$mode" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --warmup 3 --no-poisson \
        --json "$runs/gpt2_${mode}_${n}gpu.json" >> "$OUT/gpt2_runs.log" 2>&1 \
        || { echo "GPT-2 $mode on $n GPU(s) failed: see $OUT/gpt2_runs.log"; tail -20 "$OUT/gpt2_runs.log"; status=1; }
    done
  done
  "$PYTHON" - "$runs" "$OUT" <<'EOF'
import json, os, sys
runs_dir, out = sys.argv[1], sys.argv[2]
runs = {}
for n in (1, 2):
    for mode in ("nondp", "flash_fuse_fsdp"):
        path = os.path.join(runs_dir, f"gpt2_{mode}_{n}gpu.json")
        if os.path.exists(path):
            runs[(mode, n)] = json.load(open(path))
rows = []
print(f"{'mode':16} {'GPUs':>4} {'step ms':>9} {'tokens/s':>10} {'peak GiB/GPU':>13} {'vs non-DP':>9} {'scaling':>8}")
for (mode, n), r in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    base = runs.get(("nondp", n))
    one = runs.get((mode, 1))
    ratio = r["step_ms_median"] / base["step_ms_median"] if base else None
    scaling = r["tokens_per_s"] / (n * one["tokens_per_s"]) if one else None
    row = dict(mode=mode, gpus=n, step_ms=r["step_ms_median"], tokens_per_s=r["tokens_per_s"],
               peak_gib_per_gpu=r["peak_mem_gib_per_rank"], step_time_vs_nondp=ratio, scaling_efficiency=scaling)
    rows.append(row)
    print(f"{mode:16} {n:>4} {row['step_ms']:9.1f} {row['tokens_per_s']:10.0f} {max(row['peak_gib_per_gpu']):13.2f} "
          f"{ratio if ratio is not None else float('nan'):9.2f} {scaling if scaling is not None else float('nan'):8.2f}")
meta = next(iter(runs.values()), {})
json.dump({"model": "GPT-2 small (HF, untied head, SDPA)", "device": meta.get("device"), "torch": meta.get("torch"),
           "dtype": meta.get("dtype"), "batch_per_gpu": meta.get("batch_per_rank"), "seq": meta.get("seq"),
           "rows": rows, "runs": {f"{m}_{n}gpu": r for (m, n), r in runs.items()}},
          open(os.path.join(out, "gpt2_fsdp.json"), "w"), indent=1)
print(f"wrote {os.path.join(out, 'gpt2_fsdp.json')}")
EOF
fi
exit $status
