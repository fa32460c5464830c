"""How things are measured: timers, the copy bandwidth and FMA rate of the floors, peak memory,
and the stamp every result row carries.

On a CUDA device, times come from ``triton.testing.do_bench`` (CUDA events, warm-up first, the L2
flushed before every call, median with the 20th and 80th percentiles). On a CPU (smoke runs only)
a wall-clock loop stands in; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import torch

QUANTILES = (0.5, 0.2, 0.8)
REPO_ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, grad_to_none=None, warmup_ms: float = 25,
          rep_ms: float = 100, cpu_reps: int = 10) -> tuple[float, float, float]:
    """(median, p20, p80) of ``fn()`` in milliseconds.

    ``grad_to_none``: tensors whose ``.grad`` is reset to None before every call (outside the
    timed region on CUDA), so that a backward never pays for accumulating into an old gradient.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                 quantiles=list(QUANTILES))
        return float(med), float(p20), float(p80)
    times = []
    for i in range(2 + cpu_reps):  # two warm-up calls
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t0) * 1e3
        if i >= 2:
            times.append(dt)
    return _quantiles(times)


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(times), q[1], q[7]


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache in bytes (50 MB, an H100's, when it cannot be read)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        size = getattr(props, "L2_cache_size", 0) or getattr(props, "l2_cache_size", 0)
        if size:
            return int(size)
    return 50 * 2**20


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Device-to-device copy bandwidth in bytes/s: ``dst.copy_(src)`` moves 2*nbytes per call."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 32 << 20
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _, _ = bench(lambda: dst.copy_(src), device, warmup_ms=50, rep_ms=300)
    return {"copy_bytes_per_s": 2 * nbytes / (med * 1e-3),
            "copy_method": f"dst.copy_(src), {nbytes / 2**20:.0f} MiB each way, median"}


# ---- FMA rate ----------------------------------------------------------------------------------
FMA_CHAINS = 8  # independent FMA chains per element (instruction-level parallelism)
FMA_ITERS, FMA_BLOCK, FMA_WARPS = 128, 256, 8  # the kernel is in benchmarks/fma_kernel.py


def fma_reference(x: torch.Tensor, b: float, c: float, iters: int) -> torch.Tensor:
    """What the FMA kernel computes, in PyTorch (for its test)."""
    chains = [x + 0.1 * i if i else x.clone() for i in range(FMA_CHAINS)]
    for _ in range(iters):
        chains = [a * b + c for a in chains]
    a = chains
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))


def run_fma_kernel(x: torch.Tensor, b: float, c: float, iters: int) -> torch.Tensor:
    """benchmarks/fma_kernel.py's FMA-bound kernel over ``x``: ``FMA_CHAINS`` chains of
    ``a = a * b + c`` per element, ``iters`` iterations (imported here, on first use)."""
    from .fma_kernel import run

    return run(x, b, c, iters)


def fma_rate(device: torch.device) -> dict:
    """fp32 FMAs per second, measured in this run.

    CUDA: the Triton kernel above over 2^24 elements x 8 chains x 128 iterations (17.2 G FMAs;
    its 128 MiB of memory traffic is hidden under the arithmetic). CPU (smoke runs): an in-place
    ``torch.addcmul_`` on a cache-resident fp32 tensor, a rough figure only.
    On failure the rate is None and the reason is kept: the FMA floor is then not reported.
    """
    if device.type == "cuda":
        try:
            n, iters = 1 << 24, FMA_ITERS
            x = torch.rand(n, device=device, dtype=torch.float32)
            med, _, _ = bench(lambda: run_fma_kernel(x, 0.999, 0.001, iters), device,
                              warmup_ms=50, rep_ms=300)
            return {"fma_per_s": n * FMA_CHAINS * iters / (med * 1e-3),
                    "fma_method": f"Triton fp32 a=a*b+c kernel, {n} elements x {FMA_CHAINS} "
                                  f"chains x {iters} iterations, median"}
        except Exception as e:  # recorded in the row, never hidden
            return {"fma_per_s": None, "fma_method": f"failed: {type(e).__name__}: {e}"}
    n, reps = 1 << 14, 200
    acc = torch.rand(n)
    x = torch.rand(n)

    def loop():
        for _ in range(reps):
            acc.addcmul_(x, x, value=1e-6)

    med, _, _ = bench(loop, device, cpu_reps=5)
    return {"fma_per_s": n * reps / (med * 1e-3),
            "fma_method": "CPU smoke: torch.addcmul_ on a cache-resident fp32 tensor (rough)"}


# ---- peak memory -------------------------------------------------------------------------------
def check_output(what: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """``||got - ref|| / ||ref||`` in fp32 on their device (a provider's output is checked once,
    before it is timed); raises "wrong output" beyond ``tol``, NaN included."""
    rel = ((got - ref).norm() / ref.norm()).item()
    if not rel <= tol:
        raise RuntimeError(f"wrong output: {what} differs from eager's by {rel:.3g} (relative; "
                           f"at most {tol:g})")
    return rel


def release(device: torch.device | str) -> None:
    """Give the caching allocator's free blocks back between providers; quiet where a kernel's
    CUDA error has left the context unusable (the rows that follow record that error)."""
    if torch.device(device).type == "cuda":
        with suppress(RuntimeError):
            torch.cuda.empty_cache()



def peak_memory_mb(fn, device: torch.device, reset=()) -> tuple[float | None, str]:
    """Peak memory ``fn()`` allocates beyond what is allocated when it starts, in MiB.

    Everything alive before the call (inputs, weights, their gradients once reset to None) is in
    the baseline and so not counted. Only CUDA has an allocator to ask; elsewhere (None, reason).
    """
    if device.type != "cuda":
        return None, "n/a: peak memory is measured on CUDA devices only"
    for t in reset:
        t.grad = None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20, ""


# ---- stamps ------------------------------------------------------------------------------------
def git_commit() -> str:
    """The commit benchmarked: $MSLORA_COMMIT, else ``git rev-parse HEAD`` (+"-dirty" when the
    tree has changes), else "unknown" (the GPU machine gets a copy of the tree without .git)."""
    env = os.environ.get("MSLORA_COMMIT") or os.environ.get("GIT_COMMIT")
    if env:
        return env.strip()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if dirty.returncode == 0 and dirty.stdout.strip():
            commit += "-dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def stamp_line(meta: dict) -> str:
    """A stamp (``stamp``) as one line: device, versions, commit, date."""
    return (f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
            f"CUDA {meta['cuda']} | PEFT {meta['peft']} | commit {meta['commit']} | "
            f"{meta['date']}")


def stamp(device: torch.device) -> dict:
    """What every row carries: device, versions, commit, date (UTC). PEFT's version (the
    standard-LoRA rows' library) comes from its metadata: importing it imports transformers."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    try:
        peft_version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        peft_version = "not installed"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "peft": peft_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
