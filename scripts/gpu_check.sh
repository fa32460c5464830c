#!/usr/bin/env bash
# The one-command GPU check (see ../shared/GPU.md), for the lent GPU machine (no network):
#   install without network and build the CUDA extension; the check table of every backend;
#   the whole test suite on the GPU; compute-sanitizer on the CUDA kernels; the --quick
#   benchmarks. Everything lands in DIR (default $OUT, else ./gpu_out), at most 8 files:
#     DIR/gpu_check.log         every step's output
#     DIR/bench/...             the benchmark outputs, as the benchmark scripts wrote them
#   and a summary is printed last.
# Usage: MSLORA_COMMIT=<git hash> bash scripts/gpu_check.sh [DIR] [all|tests|bench]
# Each phase has its own time limit so that the whole run fits the machine's 10-minute command.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu_out}}
PHASE=${2:-all}
PY=${PYTHON:-python3}
mkdir -p "$DIR/bench"
LOG="$DIR/gpu_check.log"
export PYTHONUNBUFFERED=1 MSLORA_COMMIT=${MSLORA_COMMIT:-unknown}
unset TRITON_INTERPRET
declare -A STATUS

step() {  # step NAME SECONDS CMD...: run with a limit, log everything, remember the exit status
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  STATUS[$name]=${PIPESTATUS[0]}
  echo "=== $name exit ${STATUS[$name]}" | tee -a "$LOG"
}

{
  echo "gpu_check $(date -u +%FT%TZ) commit $MSLORA_COMMIT phase $PHASE"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$LOG"

step install 300 "$PY" -m pip install --no-deps --no-build-isolation -e .
if [ "$PHASE" = all ] || [ "$PHASE" = tests ]; then
  step check 120 "$PY" -m mslora_kernels
  step pytest 420 "$PY" -m pytest tests -q -rs --timeout=300 -p no:cacheprovider
  [ -f scripts/cuda_sanitize.sh ] && step sanitizer 180 bash scripts/cuda_sanitize.sh
fi
if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  [ -f benchmarks/run.py ] && step bench 360 "$PY" -m benchmarks.run --quick --out "$DIR/bench"
  [ -f benchmarks/bench_lora.py ] && step bench_lora 120 "$PY" -m benchmarks.bench_lora --out "$DIR/bench"
fi

echo
echo "================ summary ================"
for name in "${!STATUS[@]}"; do printf '%-12s exit %s\n' "$name" "${STATUS[$name]}"; done
grep -E '^[0-9]+ (passed|failed)|(passed|failed).* in [0-9.]+s' "$LOG" | tail -3
ls "$DIR" "$DIR/bench" 2>/dev/null
fail=0
for name in "${!STATUS[@]}"; do [ "${STATUS[$name]}" = 0 ] || fail=1; done
exit $fail
