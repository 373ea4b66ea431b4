#!/usr/bin/env bash
# One device call: GPU facts, the whole test suite on CUDA (gpu-marked tests included, mode grid on
# cuda), and the quick start on CUDA. Logs go to $OUT (or ./gpu_out). Usage: bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, opacus; print('torch', torch.__version__, 'triton', triton.__version__, 'opacus', opacus.__version__)" | tee -a "$OUT/gpu.txt"
FLASHNORM_TEST_DEVICE=cuda timeout ${PYTEST_TIMEOUT:-420} python3 -m pytest tests -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
timeout 120 python3 examples/quick_start.py --device cuda 2>&1 | grep -v it/s | tee "$OUT/quick_start_cuda.log" | tail -5
