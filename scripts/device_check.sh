#!/usr/bin/env bash
# One call on a GPU machine (torch and nvcc installed, no network): build the extension, run
# every CUDA test, then compute-sanitizer's memcheck and racecheck over one quick CUDA test per
# op family, print the benchmark table last. Logs go to $OUT (or /tmp/device_check).
# Usage: bash scripts/device_check.sh            (about 4-6 minutes on an H100/H200)
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

# compute-sanitizer over one quick test per kernel family (every csrc/cuda kernel runs):
# memcheck (out-of-bounds and misaligned accesses; torch's caching allocator off, so that each
# tensor is its own allocation and an overrun past it is caught) and racecheck (shared-memory
# hazards). Each run is capped at 150 s; a timeout (exit code 124) fails the check like an error.
SANITIZE_TESTS="(test_chol and test_matches_lapack and cuda-auto-33-dtype1) \
  or (test_eig and test_matches_lapack_small and cuda-auto-33-spd) \
  or (test_kfac and test_layer_lists_match_reference and cuda-auto-21) \
  or (test_logdet and test_gradient_matches_reference_autograd) \
  or (test_sample and test_op_normals_are_standard) \
  or (test_covariance and test_many_layers_and_outputs)"
sanitize() {   # sanitize TOOL [VAR=VALUE ...]: the subset under one compute-sanitizer tool
  local tool=$1 start rc
  shift
  start=$(date +%s)
  env "$@" timeout -k 10 150 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
    python -m pytest tests/ops -q -m cuda -p no:cacheprovider -rfE -k "$SANITIZE_TESTS" >"$LOGS/$tool.log" 2>&1
  rc=$?
  tail -4 "$LOGS/$tool.log"
  echo "$tool: exit code $rc in $(( $(date +%s) - start )) s (log: $LOGS/$tool.log)"
  return "$rc"
}
sanitizer_rc=0 sanitizer_result=clean
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)"
if [ -n "$SANITIZER" ]; then
  sanitize memcheck PYTORCH_NO_CUDA_MEMORY_CACHING=1 || sanitizer_rc=1
  sanitize racecheck || sanitizer_rc=1
  [ "$sanitizer_rc" = 0 ] || sanitizer_result=FAILED
else
  sanitizer_result="not run"
  echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin): memcheck and racecheck not run"
fi

python -m pytest --benchmark -q -p no:cacheprovider -k cuda --benchmark-columns=median,iqr,rounds \
  --benchmark-json="$LOGS/bench.json" 2>&1 | tee "$LOGS/bench.log" | \
  sed -n '/llama_fast speed-up/,$p'
echo "cuda tests exit code: $tests_rc, compute-sanitizer: $sanitizer_result"
exit $(( tests_rc != 0 ? tests_rc : sanitizer_rc ))
