#!/usr/bin/env bash
# The README's test command: set up, run both compile checks, then the whole pytest suite.
# Extra arguments go to pytest. MSLORA_SKIP_SETUP=1 skips the (idempotent) set-up step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ "${MSLORA_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh

echo "== Triton compile check (sm_90, sm_80)"
"$PY" -m mslora_kernels.checks.triton_compile
# nvcc where setup.py and the check look for it: $CUDA_HOME/bin, $CUDA_PATH/bin, then PATH
HAS_NVCC='import sys; from mslora_kernels.checks.cuda_compile import find_nvcc; sys.exit(not find_nvcc())'
if "$PY" -c "$HAS_NVCC"; then
  echo "== CUDA compile check (sm_90, sm_80)"
  "$PY" -m mslora_kernels.checks.cuda_compile
elif [ "${CI:-}" = true ]; then
  echo "== CUDA compile check: nvcc not found, and CI's machines have it" >&2
  exit 1
else
  echo "== CUDA compile check skipped: nvcc not found"
fi

echo "== pytest"
set +e
"$PY" -m pytest tests -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a broken suite, not a pass" >&2
fi
exit "$rc"
