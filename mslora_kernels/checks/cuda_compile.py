"""Compile every CUDA source in csrc/ with nvcc for sm_90 and sm_80, without a GPU.

    python -m mslora_kernels.checks.cuda_compile [--arch 90 80] [--source DIR] [--jobs N]

Each .cu/.cpp file under the source folder (default: the project's csrc/) is compiled with the
same flags as setup.py plus ``-Xptxas -v``, once per architecture. ptxas's report is parsed into
one row per kernel (every template instantiation is its own entry function): registers, spill
stores/loads, static shared memory and stack frame. Names are demangled with cu++filt or c++filt
when one is installed. Dynamic shared memory is sized at launch and is not in this report. Any
spill is a WARNING; any compile error makes the exit status 1, as does finding no source.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "csrc"


@dataclass
class Kernel:
    name: str
    regs: int = -1
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0


@dataclass
class FileResult:
    source: str
    arch: int
    ok: bool
    kernels: list[Kernel] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def include_flags(source_dir: Path) -> list[str]:
    dirs = [str(source_dir), sysconfig.get_paths()["include"]]
    try:
        import pybind11

        dirs.append(pybind11.get_include())
    except ImportError:  # the binding file then fails to compile, which is reported
        pass
    return [f"-I{d}" for d in dirs]


def parse_ptxas(text: str) -> list[Kernel]:
    """One Kernel per 'Compiling entry function' block of ``ptxas -v`` output."""
    kernels: dict[str, Kernel] = {}
    current = None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                            r"(\d+) bytes spill loads", line):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif m := re.search(r"Used (\d+) registers", line):
            current.regs = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    return list(kernels.values())


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if r.returncode == 0 and len(out) == len(names) else {
        n: n for n in names}


def compile_one(nvcc: str, source: Path, source_dir: Path, arch: int) -> FileResult:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", str(source), "-o", os.path.join(tmp, "out.o"), "-std=c++17", "-O3",
               "-Xcompiler", "-fPIC", "-Xptxas", "-v",
               "-gencode", f"arch=compute_{arch},code=sm_{arch}", *include_flags(source_dir)]
        r = subprocess.run(cmd, capture_output=True, text=True)
    rel = str(source.relative_to(source_dir))
    out = r.stdout + r.stderr
    if r.returncode != 0:
        errors = [ln for ln in out.splitlines() if "error" in ln.lower()] or out.splitlines()
        return FileResult(rel, arch, False, seconds=time.perf_counter() - t0,
                          error=" | ".join(errors[:6]))
    return FileResult(rel, arch, True, parse_ptxas(out), time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                   help="folder whose .cu/.cpp files are compiled (default: csrc/)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    a = p.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda compile check: nvcc not found in $CUDA_HOME/bin, $CUDA_PATH/bin or on PATH",
              file=sys.stderr)
        return 1
    source_dir = a.source.resolve()
    sources = sorted(p for ext in ("cu", "cpp") for p in source_dir.rglob(f"*.{ext}"))
    if not sources:
        print(f"cuda compile check: no .cu or .cpp files under {source_dir}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        results = list(ex.map(lambda job: compile_one(nvcc, job[0], source_dir, job[1]),
                              [(s, arch) for s in sources for arch in a.arch]))

    names = demangle(sorted({k.name for r in results for k in r.kernels}))
    rows = [(names[k.name], r.arch, k) for r in results if r.ok for k in r.kernels]
    width = max([len(n) for n, _, _ in rows] + [6])
    print(f"{'kernel':<{width}}  arch  regs  spill(st/ld)  smem(B)  stack(B)")
    for name, arch, k in sorted(rows, key=lambda t: (t[0], -t[1])):
        print(f"{name:<{width}}  sm{arch}  {k.regs:4d}  {k.spill_stores:5d}/{k.spill_loads:<6d}"
              f"  {k.smem:7d}  {k.stack:8d}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"ERROR: {r.source} for sm{r.arch}: {r.error}")
    spilled = [(n, arch, k) for n, arch, k in rows if k.spill_stores or k.spill_loads]
    for n, arch, k in spilled:
        print(f"WARNING: {n} on sm{arch} spills {k.spill_stores} B stores / "
              f"{k.spill_loads} B loads")
    print(f"cuda compile check: {len(sources)} files x {len(a.arch)} archs, {len(rows)} kernels, "
          f"{len(failed)} failed, {len(spilled)} with spills, "
          f"{time.perf_counter() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
