#!/usr/bin/env bash
# One call on a GPU machine (torch and nvcc installed, no network): build the extension, run
# every CUDA test, print the benchmark table last. Logs go to $OUT (or /tmp/device_check).
# Usage: bash scripts/device_check.sh            (about 3-5 minutes on an H100/H200)
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-/tmp/device_check}"
mkdir -p "$LOGS"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

export MAX_JOBS="$(nproc)" LLAMA_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
start=$(date +%s)
if ! python -m pip install --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1; then
  tail -60 "$LOGS/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

python -m pytest tests -q -m cuda -p no:cacheprovider -rfE 2>&1 | tee "$LOGS/cuda_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

python -m pytest --benchmark -q -p no:cacheprovider -k cuda --benchmark-columns=median,iqr,rounds \
  --benchmark-json="$LOGS/bench.json" 2>&1 | tee "$LOGS/bench.log" | \
  sed -n '/llama_fast speed-up/,$p'
echo "cuda tests exit code: $tests_rc"
exit "$tests_rc"
