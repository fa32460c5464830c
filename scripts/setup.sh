#!/usr/bin/env bash
# Installs mslora-kernels and everything its tests need, on a fresh machine or an existing one.
#   - torch: kept as it is when installed; otherwise 2.13.0, which on the CPU machines is the
#     local CPU wheel (pip's find-links): never let a plain `torch` requirement pull CUDA builds.
#   - triton 3.6.0 when triton is missing (the version the GPU machine runs).
#   - the package itself, editable, with its test extras; setup.py builds the CUDA extension when
#     nvcc is found (MSLORA_SKIP_CUDA_BUILD=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing torch==2.13.0"
  pip_install "torch==2.13.0"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  echo "setup: installing triton==3.6.0"
  pip_install "triton==3.6.0"
fi
echo "setup: installing mslora-kernels (editable) with its test and demo extras"
pip_install -e ".[test,demo]"
"$PY" -c "import torch, mslora_kernels as m; print('setup: mslora_kernels', m.__version__, \
'| torch', torch.__version__, '| backends on cpu:', m.available_backends('cpu'))"
