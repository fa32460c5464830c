"""Compile every Triton kernel configuration for sm_90 and sm_80, without a GPU.

    python -m mslora_kernels.checks.triton_compile [--arch 90 80] [--filter TEXT] [--module M]
                                                   [--as-inductor]

Each kernel module under ``mslora_kernels.triton`` lists, in ``compile_cases()``, every
configuration its launchers can pick. Each is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``; the PTX then goes through the ptxas Triton itself
assembles it with (``ptxas_path``), with ``-v`` for registers, spills and stack. Prints one row
per (case, arch); any spill is a WARNING; any error, or shared memory beyond what one block can
have on that arch, makes the exit status 1.

A case compiles its kernel as Triton does for arguments it cannot specialise, unless it names
arguments in ``divisible_by_16`` (the MSLoRA kernels' ``,a16`` cases at rank 128, see
``mslora_kernels.triton._compile.aligned``; LoRA linear's cases): Triton's launcher specialises
16-divisible integers and 16-byte aligned pointers, and what it compiles then can differ a lot
(vector loads; at D = 128 bf16 the backward's main kernel spills 4 B a thread there, 120 B here).

``--as-inductor`` compiles every case with the launch options Inductor keeps when it compiles a
user kernel under ``torch.compile`` (torch 2.11 to 2.15: ``num_warps`` and ``num_stages``; the
fp32 backward's ``maxnreg`` and the pinned FP fusion are dropped, so Triton's defaults apply).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not interpreted ones

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

PTXAS_ARCH = {90: "sm_90a", 80: "sm_80"}  # Triton targets sm_90a for capability 9.0
# The most shared memory one block may opt in to (H100: 227 KiB, A100: 163 KiB): a kernel that
# needs more compiles but cannot launch, so the check fails it.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclass
class Result:
    name: str
    arch: int
    ok: bool
    regs: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    seconds: float = 0.0
    error: str = ""


def kernel_modules(extra: list[str]) -> list[str]:
    import mslora_kernels.triton as pkg

    names = [
        f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_")
    ]
    return sorted(names) + list(extra)


def collect_cases(modules: list[str], text: str | None):
    """(module, case name) of every case whose name contains ``text``. A module's case names
    must be unique: a worker finds its case again by name, so a second case of the same name
    would silently be compiled as the first."""
    cases = []
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        if not hasattr(mod, "compile_cases"):
            continue
        names = [case.name for case in mod.compile_cases()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{mod_name}.compile_cases() names several cases {twice}")
        cases += [(mod_name, n) for n in names if text is None or text in n]
    return cases


def ptxas_path(arch: int) -> str:
    """The ptxas Triton assembles sm_``arch`` with: its own choice, which has moved between
    versions (3.3: ``get_ptxas(arch)`` gives (path, version); 3.4-3.5: ``get_ptxas()`` a tool;
    3.6 on: ``get_ptxas(arch)`` a tool, and from 3.9 the newer ``ptxas-blackwell`` for sm_90,
    since its PTX has a version the bundled ``ptxas`` does not read)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()
    return tool[0] if isinstance(tool, tuple) else tool.path


def ptxas_report(ptx: str, arch: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    ptxas = ptxas_path(arch)
    try:
        r = subprocess.run([ptxas, "-v", f"--gpu-name={PTXAS_ARCH[arch]}", f.name,
                            "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    out = r.stdout + r.stderr
    if r.returncode != 0:  # ptxas says why (e.g. a PTX version it does not know)
        why = [line for line in out.splitlines() if "fatal" in line or "error" in line]
        raise RuntimeError(f"{ptxas} exited {r.returncode}: " + " | ".join(why or out.splitlines()))
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, out)) else 0
    return {"regs": grab(r"Used (\d+) registers"), "stack": grab(r"(\d+) bytes stack frame"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


# The launch options Inductor passes on when it compiles a user kernel (torch 2.11 to 2.15).
INDUCTOR_OPTIONS = ("num_warps", "num_stages")


def compile_one(job) -> Result:
    mod_name, case_name, arch, as_inductor = job
    mod = importlib.import_module(mod_name)
    case = next(c for c in mod.compile_cases() if c.name == case_name)
    opts = case.options()
    if as_inductor:
        opts = {k: v for k, v in opts.items() if k in INDUCTOR_OPTIONS}
    t0 = time.perf_counter()
    try:
        src = ASTSource(case.fn, case.signature, case.constexprs, case.attrs())
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        rep = ptxas_report(k.asm["ptx"], arch)
        if k.metadata.shared > SHARED_LIMIT[arch]:
            raise RuntimeError(f"needs {k.metadata.shared} B of shared memory; sm_{arch} blocks "
                               f"can have at most {SHARED_LIMIT[arch]} B")
        return Result(case_name, arch, True, shared=k.metadata.shared,
                      seconds=time.perf_counter() - t0, **rep)
    except Exception as e:  # noqa: BLE001 - every failure is reported, then fails the run
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return Result(case_name, arch, False, seconds=time.perf_counter() - t0,
                      error=" | ".join(msg[-6:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(PTXAS_ARCH))
    p.add_argument("--filter", default=None, help="only cases whose name contains this text")
    p.add_argument("--module", action="append", default=[],
                   help="also check this importable module's compile_cases()")
    p.add_argument("--only-module", action="store_true",
                   help="check only the modules given with --module")
    p.add_argument("--as-inductor", action="store_true",
                   help="compile with only the launch options Inductor keeps under torch.compile "
                        "(num_warps, num_stages)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    a = p.parse_args(argv)

    modules = list(a.module) if a.only_module else kernel_modules(a.module)
    cases = collect_cases(modules, a.filter)
    if not cases:
        print("triton compile check: no kernel configurations found", file=sys.stderr)
        return 1
    jobs = [(m, c, arch, a.as_inductor) for m, c in cases for arch in a.arch]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.jobs) as ex:
        results = list(ex.map(compile_one, jobs))

    width = max(len(r.name) for r in results)
    print(f"{'kernel configuration':<{width}}  arch  regs  spill(st/ld)  stack  shared(B)  time(s)")
    for r in results:
        if r.ok:
            print(f"{r.name:<{width}}  sm{r.arch}  {r.regs:4d}  "
                  f"{r.spill_stores:5d}/{r.spill_loads:<6d}  {r.stack:5d}  {r.shared:9d}  "
                  f"{r.seconds:7.1f}")
        else:
            print(f"{r.name:<{width}}  sm{r.arch}  ERROR {r.error}")
    failed = [r for r in results if not r.ok]
    spilled = [r for r in results if r.ok and (r.spill_stores or r.spill_loads)]
    for r in spilled:
        print(f"WARNING: {r.name} on sm{r.arch} spills {r.spill_stores} B stores / "
              f"{r.spill_loads} B loads")
    print(f"triton compile check: {len(results) - len(failed)} compiled, {len(failed)} failed, "
          f"{len(spilled)} with spills, {time.perf_counter() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
