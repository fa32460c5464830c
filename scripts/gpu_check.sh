#!/usr/bin/env bash
# The one-command GPU check (see ../shared/GPU.md), for the lent GPU machine (no network):
#   install without network and build the CUDA extension; the check table of every backend;
#   the whole test suite on the GPU; compute-sanitizer on the CUDA kernels; the --quick
#   benchmarks. Everything lands in DIR (default $OUT, else ./gpu_out), at most 8 files:
#     DIR/gpu_check.log         every step's output
#     DIR/bench/...             the benchmark outputs, as the benchmark scripts wrote them
#   and a summary is printed last.
# Usage: MSLORA_COMMIT=<git hash> bash scripts/gpu_check.sh [DIR] [PHASES]
#   PHASES: comma-separated, from tests, sanitize, bench, pybench; `all` = the first three.
# Each step has its own time limit. One device command may run 10 minutes, so on the lent machine
# run the phases `tests`, `sanitize` and `bench` as three commands (each fits; `all` does not).
# Start each next command at once: the machine stays warm 30 s after a call (then the next call
# starts a bare one, a minute or more of device time), and a warm one keeps the Triton cache and
# the extension's build.
# The extension is built for sm_90 only there (MSLORA_CUDA_ARCHS) with all cores (MAX_JOBS).
# The tests run in parallel processes (pytest-xdist, installed there; MSLORA_TEST_WORKERS, default
# 8): the GPU tests' time is mostly Triton's JIT compiles, one CPU core each.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu_out}}
PHASE=${2:-all}
PY=${PYTHON:-python3}
mkdir -p "$DIR/bench"
LOG="$DIR/gpu_check.log"
export PYTHONUNBUFFERED=1 MSLORA_COMMIT=${MSLORA_COMMIT:-unknown}
export MSLORA_CUDA_ARCHS=${MSLORA_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET
declare -A STATUS

for ph in ${PHASE//,/ }; do
  case "$ph" in all|tests|sanitize|bench|pybench) ;;
    *) echo "gpu_check: unknown phase '$ph' (phases: all, tests, sanitize, bench, pybench)" >&2
       exit 2 ;;
  esac
done

want() {  # want PHASE: is it among the comma-separated PHASES (all = tests, sanitize, bench)?
  case ",$PHASE," in *",$1,"*) return 0 ;; esac
  [ "$PHASE" = all ] && [ "$1" != pybench ]
}

step() {  # step NAME SECONDS CMD...: run with a limit, log everything, remember the exit status
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  if [ -n "${MSLORA_GPU_CHECK_DRY:-}" ]; then STATUS[$name]=0; return; fi  # print the plan only
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  STATUS[$name]=${PIPESTATUS[0]}
  echo "=== $name exit ${STATUS[$name]}" | tee -a "$LOG"
}

[ -n "${MSLORA_GPU_CHECK_DRY:-}" ] || {
  echo "gpu_check $(date -u +%FT%TZ) commit $MSLORA_COMMIT phase $PHASE"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$LOG"

step install 150 "$PY" -m pip install --no-deps --no-build-isolation -e .
XDIST=()
WORKERS=${MSLORA_TEST_WORKERS:-8}
if [ "$WORKERS" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$WORKERS" --dist loadgroup)  # loadgroup: a group's tests share one worker
fi

if want tests; then
  # The GPU tests first, in a step of their own: what only this machine can check gets its
  # verdict and summary even if the rest runs out of time. Then the rest of the suite (CI's, but
  # here with CUDA present and no interpreter).
  step pytest_gpu 270 "$PY" -m pytest tests -m gpu -q -rfEs --durations=20 --timeout=300 \
    -p no:cacheprovider "${XDIST[@]}"
  step pytest 170 "$PY" -m pytest tests -m "not gpu" -q -rfEs --durations=20 --timeout=300 \
    -p no:cacheprovider "${XDIST[@]}"
fi
if want sanitize; then
  step check 120 "$PY" -m mslora_kernels
  # The sanitizer's own logs stay on the machine (8 files come back); their tails go to the log.
  step sanitizer 300 bash -c 'bash scripts/cuda_sanitize.sh /tmp/sanitize; rc=$?;
    tail -n 40 /tmp/sanitize/*.log; exit $rc'
fi
if want bench; then
  step bench 300 "$PY" -m benchmarks.run --quick --out "$DIR/bench"
  step bench_lora 100 "$PY" -m benchmarks.bench_lora --out "$DIR/bench"
fi
if want pybench; then  # the pytest-benchmark view of the --quick shapes (issue 6, item 5)
  step pybench 400 "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-columns=min,median,iqr,rounds
fi

echo
echo "================ summary ================"
for name in "${!STATUS[@]}"; do printf '%-12s exit %s\n' "$name" "${STATUS[$name]}"; done
grep -E '^[0-9]+ (passed|failed)|(passed|failed).* in [0-9.]+s' "$LOG" | tail -3
ls "$DIR" "$DIR/bench" 2>/dev/null
fail=0
for name in "${!STATUS[@]}"; do [ "${STATUS[$name]}" = 0 ] || fail=1; done
exit $fail
