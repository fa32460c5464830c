"""Where a fused backend's time goes, kernel by kernel: fwd+bwd steps under torch.profiler.

    python -m benchmarks.kernel_profile [--providers triton cuda] [--preset resnet50] [--stage 1]
                                 [--dtype bf16] [--layout channels_first] [--steps 5] [--out DIR]

The runner (``benchmarks.run``) times whole calls; this says which kernel inside a call takes the
time, so that the next change is chosen from a measurement (for instance the Triton backward's
main kernel against its weight-gradient atomics, or one CUDA pass against another). For each
provider: two warm-up steps, then ``--steps`` forward+backward steps under ``torch.profiler``; per
kernel (device time on a GPU), its calls and time per step and its share of the step. On a CPU
the fused backends do not run: it profiles the eager reference at the tiny CPU size (operators'
CPU time), which says nothing about a GPU.

Prints one table per provider (the GPU check puts them in its log); ``--out DIR`` also writes
them to ``DIR/profile.md``. Every table is stamped like the benchmark outputs (device, versions,
commit, date). (Not ``profile.py``: a script run from this folder, ``python
benchmarks/bench_lora.py``, would import it in place of the standard library's ``profile``.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import measure, presets, providers

TOP = 15  # kernels listed per provider; the rest summed in one row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", nargs="+", default=["triton", "cuda"],
                   choices=providers.PROVIDERS)
    p.add_argument("--preset", default="resnet50", choices=sorted(presets.PRESETS))
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default="bf16", choices=sorted(providers.DTYPES))
    p.add_argument("--layout", default="channels_first", choices=presets.LAYOUTS)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write DIR/profile.md")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    return a


def _device_time(e, on_gpu: bool) -> float:
    """An event's own time in us: device time on a GPU (kernels, copies), else CPU time."""
    if on_gpu:
        return float(getattr(e, "self_device_time_total", 0.0)
                     or getattr(e, "self_cuda_time_total", 0.0))
    return float(e.self_cpu_time_total)


def profile_one(fn, x, gy, steps: int, device: torch.device) -> list[tuple[str, int, float]]:
    """(name, calls per step, us per step) of every kernel (operator on a CPU) that took time in
    ``steps`` forward+backward steps of ``fn`` on ``x``, most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        x.grad = None
        fn(x).backward(gy)

    for _ in range(2):  # compiles and autotuning stay out of the profile
        step()
    measure.sync(device)
    on_gpu = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        measure.sync(device)
    rows = [(e.key, e.count // steps, _device_time(e, on_gpu) / steps)
            for e in prof.key_averages()]
    return sorted((r for r in rows if r[2] > 0), key=lambda r: -r[2])


def table(provider: str, detail: str, rows: list[tuple[str, int, float]], on_gpu: bool) -> str:
    total = sum(r[2] for r in rows)
    what = "device time" if on_gpu else "CPU time (operators; says nothing about a GPU)"
    out = [f"### {provider}: {detail}", "",
           f"{total / 1000:.3f} ms of {what} per forward+backward step", "",
           "| kernel | calls / step | us / step | share |", "| --- | ---: | ---: | ---: |"]
    shown, rest = rows[:TOP], rows[TOP:]
    for name, calls, us in shown:
        out.append(f"| `{name[:90]}` | {calls} | {us:.1f} | {us / total:.1%} |")
    if rest:
        us = sum(r[2] for r in rest)
        out.append(f"| {len(rest)} others | | {us:.1f} | {us / total:.1%} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        preset, stage, rank = presets.PRESETS[a.preset], a.stage, a.rank
    else:  # the tiny CPU size, the reference only
        preset, stage, rank = presets.TINY, 1, presets.TINY_RANK
    shape = presets.shapes_of(preset, [stage], a.batch)[0]
    dtype = providers.DTYPES[a.dtype] if on_gpu else torch.float32
    meta = measure.stamp(device)
    head = (f"## Kernel profile: {shape.long_label}, D={rank}, G={a.groups}, K=(3, 5, 7), "
            f"{a.layout}, {dtype}\n\n{measure.stamp_line(meta)}\n")
    parts = [head]
    base = providers.make_base(shape.c, rank, a.groups, (3, 5, 7), a.layout, dtype, device)
    x = providers.make_input(shape.n, shape.c, shape.h, shape.w, a.layout, dtype, device, seed=1)
    gy = providers.make_input(shape.n, shape.c, shape.h, shape.w, a.layout, dtype, device, seed=2,
                              requires_grad=False)
    wanted = a.providers if on_gpu else ["eager"]
    failed = False
    for name in wanted:
        why = providers.unavailable(name, device)
        if why:
            parts.append(f"### {name}: not run ({why})\n")
            continue
        try:
            fn, detail = providers.build(name, base)
            parts.append(table(name, detail, profile_one(fn, x, gy, a.steps, device), on_gpu))
        except Exception as e:  # noqa: BLE001 - a provider that fails records the failure
            failed = True
            parts.append(f"### {name}: FAILED ({type(e).__name__}: {str(e)[:300]})\n")
        measure.release(device)
    text = "\n".join(parts)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "profile.md").write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
