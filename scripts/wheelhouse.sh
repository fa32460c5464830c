#!/usr/bin/env bash
# PEFT for the GPU machine, which has no network (../shared/GPU.md) and no PEFT: the benchmarks'
# standard-LoRA rows (benchmarks.e2e's lora-peft, benchmarks.bench_lora's peft-lora) record
# "PEFT is not importable" there unless it comes with the working tree. This downloads, on a
# machine that reaches PyPI, the wheels PEFT needs beyond torch and its own dependencies (which
# the GPU machine has), for the Python that runs it; run it with the GPU machine's Python (3.12).
# A device call that names the folder in `carry` gets PEFT installed by scripts/gpu_check.sh's
# peft step, offline, keeping every installed package that already satisfies PEFT.
# Usage: PYTHON=python3.12 bash scripts/wheelhouse.sh [DIR]     (DIR default wheelhouse/, ignored)
#   TORCH   the GPU machine's torch (default 2.11.0): its dependencies are left out
#   PEFT    a PEFT requirement (default: peft, the newest that resolves with that torch)
#   SKIP    names also left out, as the GPU machine has them (default: numpy)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheelhouse}
PY=${PYTHON:-python3}
TORCH=${TORCH:-2.11.0} PEFT=${PEFT:-peft} SKIP=${SKIP:-numpy}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
pip_() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

# What pip would install into an empty environment for PEFT with that torch, and for the torch
# alone (metadata only, nothing downloaded): the difference is what the GPU machine lacks.
pip_ install --dry-run --ignore-installed --report "$TMP/with.json" "$PEFT" "torch==$TORCH"
pip_ install --dry-run --ignore-installed --report "$TMP/torch.json" "torch==$TORCH"
"$PY" - "$TMP" "$SKIP" > "$TMP/wanted.txt" <<'EOF'
import json, re, sys
tmp, skip = sys.argv[1], sys.argv[2].split()
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
names = lambda f: {norm(i["metadata"]["name"]): i["metadata"]["version"]
                   for i in json.load(open(f"{tmp}/{f}"))["install"]}
have = set(names("torch.json")) | {norm(s) for s in skip}
for name, version in sorted(names("with.json").items()):
    if name not in have:
        print(f"{name}=={version}")
EOF
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
pip_ download --no-deps --only-binary=:all: -d "$DIR" -r "$TMP/wanted.txt"
cp "$TMP/wanted.txt" "$DIR/requirements.txt"
echo "wheelhouse: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR for" \
  "$("$PY" -c 'import sys; print("Python", sys.version.split()[0])'), torch $TORCH left out:"
paste -sd' ' "$DIR/requirements.txt"
