#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on small MSLoRA CUDA-backend cases.
# Usage: scripts/cuda_sanitize.sh [LOG_DIR]   (needs a GPU, compute-sanitizer and the built _C)
set -u
cd "$(dirname "$0")/.."
LOG_DIR="${1:-${OUT:-.}}"
mkdir -p "$LOG_DIR"
SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
status=0
for tool in memcheck racecheck; do
  log="$LOG_DIR/cuda_sanitize_$tool.log"
  if "$SAN" --tool "$tool" --error-exitcode 1 --kernel-name regex:mslora \
      "${PYTHON:-python3}" scripts/cuda_sanitize_case.py >"$log" 2>&1; then
    echo "compute-sanitizer $tool: clean ($(grep -c '^ok' "$log") cases)"
  else
    echo "compute-sanitizer $tool: FAILED, see $log"; tail -20 "$log"; status=1
  fi
done
exit $status
