#!/usr/bin/env bash
# The test suite on a CPU machine with the GPU machine's Python packages (../shared/GPU.md):
# torch 2.11.0 (PyPI's CUDA 13.0 build, which also runs without a GPU), torchvision 0.26.0,
# triton 3.6.0, timm and peft, in a venv of its own (VENV, default /tmp/mslora-gpu-stack; about
# 5 GB, downloaded once). It finds what differs from CI's torch 2.13 before a GPU session spends
# its minutes on it, and it runs the timm and torchvision tests that CI skips. The GPU tests
# still skip. Not part of CI, because of the download.
# Usage: bash scripts/test_gpu_stack.sh [pytest arguments]   (default: tests -n 2, one per core)
# Other versions: TORCH=2.9.1 TORCHVISION=0.24.1 TRITON=3.5.1 VENV=/tmp/v29 bash scripts/test_gpu_stack.sh
# The newest (December 2026), past the CPU machines' pip cap (torch <= 2.14.1, /etc/xdg/pip):
# PIP_CONFIG_FILE=/dev/null TORCH=2.15.0 TORCHVISION=0.29.2 TRITON=3.9.0 VENV=/tmp/v215 bash ...
# (the extension is built in place, for the venv's torch: run it from a clone, not your checkout).
# PYTHON makes the venv (default python3); the GPU machine runs Python 3.12, e.g.
# PYTHON=~/.pyenv/versions/3.12.1/bin/python VENV=/tmp/gs312 bash scripts/test_gpu_stack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/mslora-gpu-stack}
TORCH=${TORCH:-2.11.0} TORCHVISION=${TORCHVISION:-0.26.0} TRITON=${TRITON:-3.6.0}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

pip_install torch==$TORCH torchvision==$TORCHVISION triton==$TRITON timm peft numpy safetensors tqdm \
  pytest pytest-xdist pytest-timeout pytest-benchmark matplotlib pybind11 setuptools wheel
pip_install --no-deps --no-build-isolation -e .
"$PY" -c "import torch, torchvision, triton, timm; print('gpu stack: torch', torch.__version__, \
'| torchvision', torchvision.__version__, '| triton', triton.__version__, '| timm', timm.__version__)"
[ $# -gt 0 ] || set -- tests -n 2
exec "$PY" -m pytest -q -p no:cacheprovider --timeout=900 "$@"
