#!/usr/bin/env bash
# One device call on an H200 (from the repository root; opacus and mlxtend carried as wheels in .whl/):
#   1. the whole test suite on CUDA: the gpu-marked kernel tests, the mode grid with FLASHNORM_TEST_DEVICE=cuda;
#   2. the quick start on CUDA;
#   3. the per-step overhead profile of GPT-2 small in flash_fuse (issue 4, item 3).
# Logs go to $OUT (or ./gpu_out). PYTEST_TIMEOUT bounds step 1 (seconds).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, opacus; print('torch', torch.__version__, 'triton', triton.__version__, 'opacus', opacus.__version__)" | tee -a "$OUT/gpu.txt"
FLASHNORM_TEST_DEVICE=cuda timeout "${PYTEST_TIMEOUT:-300}" python3 -m pytest tests -q -p no:cacheprovider \
  --ignore=tests/distributed ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
timeout 90 python3 examples/quick_start.py --device cuda 2>&1 | grep -v it/s | tee "$OUT/quick_start_cuda.log" | tail -3
timeout 120 python3 -m benchmarks.overhead --profile --json "$OUT/overhead_h200.json" 2>&1 | tee "$OUT/overhead.log" | tail -30
