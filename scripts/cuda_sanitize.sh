#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on small MSLoRA CUDA-backend cases; only our kernels
# (names containing "mslora": kns= is compute-sanitizer's substring filter) are checked.
# Usage: scripts/cuda_sanitize.sh [LOG_DIR]   (needs a GPU, compute-sanitizer and the built _C)
set -u
cd "$(dirname "$0")/.."
LOG_DIR="${1:-${OUT:-.}}"
mkdir -p "$LOG_DIR"
SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
# PyTorch's caching allocator would hand out every small tensor from one 2 MiB block, inside which
# memcheck sees no tensor's end: an access past x into the next workspace would pass as clean.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in memcheck racecheck; do
  log="$LOG_DIR/cuda_sanitize_$tool.log"
  if "$SAN" --tool "$tool" --error-exitcode 1 --kernel-name kns=mslora \
      "${PYTHON:-python3}" scripts/cuda_sanitize_case.py >"$log" 2>&1; then
    echo "compute-sanitizer $tool: clean ($(grep -c '^ok' "$log") cases)"
  else
    echo "compute-sanitizer $tool: FAILED, see $log"; tail -20 "$log"; status=1
  fi
done
exit $status
