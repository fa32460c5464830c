#!/usr/bin/env bash
# The one-command GPU check (see ../shared/GPU.md), for the lent GPU machine (no network).
#
# A session is lent 15 minutes of device time in all, the machine's start (a minute or more) and
# its idle time included, so the check is ONE command with a time budget of its own
# (MSLORA_GPU_BUDGET_S, default 480 s): its steps run in order of what the open issues need most,
# each with a limit cut to what the budget still holds, and a step that no longer fits is recorded
# as skipped, never half-counted:
#     install      pip install -e . (builds the CUDA extension, sm_90 only, every core; a
#                  re-run on the still-warm machine copies it from setup.py's build cache unless
#                  csrc/ changed), and fails unless the CUDA backend is then ready
#     pytest_gpu   the GPU tests (tests -m gpu): kernels against the reference, opcheck,
#                  torch.compile, CUDA graphs, CUDA vs Triton
#     sanitizer    compute-sanitizer memcheck and racecheck on small CUDA-backend cases
#     peft         PEFT, offline, from the wheels scripts/wheelhouse.sh gathered, for the
#                  benchmarks' standard-LoRA rows: only when the device call carried them
#                  (MSLORA_WHEELHOUSE, default wheelhouse/; about 15 s); without them, those
#                  rows record that PEFT is not importable
#     bench        python -m benchmarks.run --quick, its time budget cut to the step's limit
#     check        python -m mslora_kernels (the check table of every backend)
#     bench_lora   the Serial LoRA / MSPLoRA benchmark
#     profile      python -m benchmarks.kernel_profile: each fused backend's fwd+bwd, kernel by
#                  kernel (ResNet-50 stage 1, bf16), printed into the log (no file: 8 come back)
#     pytest       the rest of the suite (CI runs it on the CPU; here CUDA is present)
#     pybench      pytest benchmarks --benchmark-only (only when asked for)
# The earlier steps leave the later essential ones (pytest_gpu, sanitizer, bench) their floors.
# 480 s plus a start leaves about 4-5 of the 15 minutes for one targeted re-run after a fix
# (PHASES and MSLORA_GPU_TESTS below). Everything lands in DIR (default $OUT, else ./gpu_out),
# at most 8 files, which is what the device tool brings back:
#     DIR/gpu_check.log         every step's output (and the sanitizer logs' tails)
#     DIR/bench/...             the benchmark outputs, as the benchmark scripts wrote them
# and a summary is printed last.
#
# Usage: MSLORA_COMMIT=<git hash> bash scripts/gpu_check.sh [DIR] [PHASES]
#   PHASES: comma-separated, from tests (pytest_gpu), sanitize (sanitizer, check), bench (bench,
#   bench_lora), suite (pytest), pybench; default `all` = tests,sanitize,bench.
# Exit status: 0 all done and passed, 1 a step failed, 3 none failed but a step was skipped.
# Environment:
#   MSLORA_GPU_BUDGET_S   seconds for the whole command (default 480); give the device call a
#                         timeout_s of the budget plus a minute
#   MSLORA_WHEELHOUSE     the wheels for the peft step (default wheelhouse; run's carry names it)
#   MSLORA_GPU_TESTS      what pytest_gpu runs (default `tests`), e.g. a file or `tests -k cuda`
#                         for a re-run of what failed
#   MSLORA_TEST_WORKERS   pytest-xdist workers (default: one per core; xdist is installed there):
#                         the GPU tests' time is mostly Triton's and Inductor's compiles, one
#                         core each (about 1,400 CPU-seconds of Triton compiles alone, measured
#                         on the CPU machine with the GPU tests' configurations)
#   MSLORA_GPU_CHECK_DRY  print the plan without running anything; each step is taken to use
#                         its whole limit, so the plan shows what a worst case would skip
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu_out}}
PHASE=${2:-all}
PY=${PYTHON:-python3}
DRY=${MSLORA_GPU_CHECK_DRY:-}
BUDGET=${MSLORA_GPU_BUDGET_S:-480}
WHEELHOUSE=${MSLORA_WHEELHOUSE:-wheelhouse}
mkdir -p "$DIR/bench"
LOG="$DIR/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 MSLORA_COMMIT=${MSLORA_COMMIT:-unknown}
export MSLORA_CUDA_ARCHS=${MSLORA_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET

# Every step, in the order they run: phase, cap (s), floor (s: less than this is not worth
# starting), essential (later-step time the earlier steps leave free).
STEPS=(install pytest_gpu sanitizer peft bench check bench_lora profile pytest pybench)
declare -A STEP_PHASE=([install]=- [pytest_gpu]=tests [sanitizer]=sanitize [peft]=bench
  [bench]=bench [check]=sanitize [bench_lora]=bench [profile]=bench [pytest]=suite
  [pybench]=pybench)
declare -A CAP=([install]=150 [pytest_gpu]=300 [sanitizer]=120 [peft]=60 [bench]=300 [check]=120
  [bench_lora]=100 [profile]=60 [pytest]=200 [pybench]=400)
declare -A FLOOR=([install]=30 [pytest_gpu]=60 [sanitizer]=45 [peft]=20 [bench]=90 [check]=30
  [bench_lora]=40 [profile]=20 [pytest]=60 [pybench]=60)
declare -A ESSENTIAL=([pytest_gpu]=1 [sanitizer]=1 [bench]=1)
declare -A STATUS

case "$BUDGET" in ''|*[!0-9]*)
  echo "gpu_check: MSLORA_GPU_BUDGET_S must be whole seconds, got '$BUDGET'" >&2; exit 2 ;;
esac
for ph in ${PHASE//,/ }; do
  case "$ph" in all|tests|sanitize|bench|suite|pybench) ;;
    *) echo "gpu_check: unknown phase '$ph' (phases: all, tests, sanitize, bench, suite," \
         "pybench)" >&2
       exit 2 ;;
  esac
done

want() {  # want STEP: is its phase among the comma-separated PHASES (all = tests,sanitize,bench)?
  local ph=${STEP_PHASE[$1]}
  [ "$1" != peft ] || [ -d "$WHEELHOUSE" ] || return 1  # only with the wheels
  [ "$ph" = - ] && return 0
  case ",$PHASE," in *",$ph,"*) return 0 ;; esac
  case "$ph" in tests|sanitize|bench) [ "$PHASE" = all ] ;; *) return 1 ;; esac
}

CLOCK=0  # the dry run's clock: each step takes its whole limit
now() { if [ -n "$DRY" ]; then echo "$CLOCK"; else date +%s; fi; }
T0=$(now)
DEADLINE=$((T0 + BUDGET))

limit_for() {  # limit_for STEP: sets LIMIT (s) from the budget left; returns 1 if it cannot fit
  local name=$1 left reserve=0 later=0 s
  left=$((DEADLINE - $(now)))
  for s in "${STEPS[@]}"; do
    if [ "$s" = "$name" ]; then later=1; continue; fi
    if [ "$later" = 1 ] && want "$s" && [ -n "${ESSENTIAL[$s]:-}" ]; then
      reserve=$((reserve + FLOOR[$s]))
    fi
  done
  LIMIT=$((left - reserve))
  # An earlier essential step (and install) comes first, into later ones' floors; an optional
  # step (peft, before bench) never does.
  if [ "$LIMIT" -lt "${FLOOR[$name]}" ]; then
    [ -n "${ESSENTIAL[$name]:-}" ] || [ "$name" = install ] || return 1
    LIMIT=${FLOOR[$name]}
  fi
  [ "$LIMIT" -le "${CAP[$name]}" ] || LIMIT=${CAP[$name]}
  [ "$LIMIT" -le "$left" ] || LIMIT=$left
  [ "$LIMIT" -ge "${FLOOR[$name]}" ]
}

step() {  # step NAME SIGNAL CMD...: run within LIMIT, log everything, remember the exit status.
  # pytest gets SIGINT (it then prints its summary of what ran); the others SIGTERM (the benchmark
  # runner then writes everything it measured).
  local name=$1 sig=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${LIMIT}s): $*" | tee -a "$LOG"
  if [ -n "$DRY" ]; then STATUS[$name]=0; CLOCK=$((CLOCK + LIMIT)); return; fi
  timeout -s "$sig" -k 20 "$LIMIT" "$@" 2>&1 | tee -a "$LOG"
  STATUS[$name]=${PIPESTATUS[0]}
  echo "=== $name exit ${STATUS[$name]}" | tee -a "$LOG"
}

run_step() {  # run_step NAME SIGNAL CMD...: step, if the phase wants it and the budget holds it
  local name=$1
  want "$name" || return 0
  if ! limit_for "$name"; then
    STATUS[$name]=skipped
    echo "=== $name skipped: $((DEADLINE - $(now)))s of the ${BUDGET}s budget left, it needs" \
      "${FLOOR[$name]}s" | tee -a "$LOG"
    return 0
  fi
  step "$@"
}

[ -n "$DRY" ] || {
  echo "gpu_check $(date -u +%FT%TZ) commit $MSLORA_COMMIT phase $PHASE budget ${BUDGET}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee -a "$LOG"

XDIST=()
WORKERS=${MSLORA_TEST_WORKERS:-$(nproc)}
if [ "$WORKERS" -gt 1 ] && { [ -n "$DRY" ] || "$PY" -c "import xdist" 2>/dev/null; }; then
  XDIST=(-n "$WORKERS" --dist loadgroup)  # loadgroup: a group's tests share one worker
fi
read -r -a GPU_TESTS <<< "${MSLORA_GPU_TESTS:-tests}"
PYTEST=(-q -rfEs --durations=20 --timeout=300 -p no:cacheprovider)

# The extension must load here: without it every CUDA test would skip and the run look green.
run_step install TERM bash -c '"$0" -m pip install --no-deps --no-build-isolation -e . &&
  "$0" -c "from mslora_kernels.backends import cuda_unavailable_reason as r; import torch, sys;
why = r(torch.device(\"cuda\")); print(\"install: CUDA backend\", why or \"ready\");
sys.exit(1 if why else 0)"' "$PY"
run_step pytest_gpu INT "$PY" -m pytest "${GPU_TESTS[@]}" -m gpu "${PYTEST[@]}" "${XDIST[@]}"
# The sanitizer's own logs stay on the machine (8 files come back); their tails go to the log.
run_step sanitizer TERM bash -c 'bash scripts/cuda_sanitize.sh /tmp/sanitize; rc=$?;
  tail -n 40 /tmp/sanitize/*.log; exit $rc'
run_step peft TERM "$PY" -m pip install --disable-pip-version-check -q --no-index \
  --find-links "$WHEELHOUSE" peft
# The runner's own budget ends its rows a minute before the step's limit (imports, the row in
# progress, the plots); the limit's SIGTERM still ends it through writing what it measured.
if want bench && limit_for bench; then BENCH_BUDGET=$((LIMIT > 90 ? LIMIT - 60 : 30)); fi
run_step bench TERM "$PY" -m benchmarks.run --quick --time-budget "${BENCH_BUDGET:-30}" \
  --out "$DIR/bench"
run_step check TERM "$PY" -m mslora_kernels
run_step bench_lora TERM "$PY" -m benchmarks.bench_lora --out "$DIR/bench"
run_step profile TERM "$PY" -m benchmarks.kernel_profile
run_step pytest INT "$PY" -m pytest tests -m "not gpu" "${PYTEST[@]}" "${XDIST[@]}"
run_step pybench INT "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-columns=min,median,iqr,rounds

echo
echo "================ summary ($(($(now) - T0))s of the ${BUDGET}s budget) ================"
fail=0 rerun=()
for name in "${STEPS[@]}"; do
  [ -n "${STATUS[$name]:-}" ] || continue
  printf '%-12s %s\n' "$name" "$([ "${STATUS[$name]}" = skipped ] && echo skipped \
    || echo "exit ${STATUS[$name]}")"
  [ "${STATUS[$name]}" = 0 ] && continue
  [ "$name" = install ] || rerun+=("${STEP_PHASE[$name]}")
  if [ "${STATUS[$name]}" != skipped ]; then fail=1; elif [ "$fail" = 0 ]; then fail=3; fi
done
grep -E '^[0-9]+ (passed|failed)|(passed|failed).* in [0-9.]+s' "$LOG" | tail -3
[ ${#rerun[@]} -eq 0 ] || echo "not done or failed, by phase: $(printf '%s\n' "${rerun[@]}" \
  | awk '!seen[$0]++' | paste -sd, -)"
ls "$DIR" "$DIR/bench" 2>/dev/null
exit $fail
