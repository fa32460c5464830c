"""``python -m mslora_kernels``: check every backend usable here against the float64 reference.

Builds MSLoRA modules at an odd shape, runs each available backend (forward and every gradient)
in each dtype and layout it supports on this machine (on a CPU: fp32, and the Triton kernels
under ``TRITON_INTERPRET=1`` in bf16 and fp16 too), and prints one table row per case with the
relative errors and SPEC section 4's verdict. Backends that cannot run here are listed with why.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import MSLoRA
from .backends import fused_unavailable_reason
from .testing import check_close, no_tf32, rel_error

LAYOUTS = {  # name -> (data_format, memory format of the input)
    "NCHW": ("channels_first", torch.contiguous_format),
    "NCHW-cl": ("channels_first", torch.channels_last),
    "NHWC": ("channels_last", torch.contiguous_format),
}
OPTIONS = {"plain": {}, "all": dict(prenorm=True, enhance=True, pool=True, gate=True,
                                    shuffle=True)}


def run_case(backend, device, dtype, layout, opts, shape, seed=0):
    """Forward + backward of one backend vs the float64 reference; returns (errors, seconds)."""
    n, c, h, w, d, g = shape
    fmt, mem = LAYOUTS[layout]
    torch.manual_seed(seed)
    ref = MSLoRA(c, d, g, data_format=fmt, backend="reference", **OPTIONS[opts])
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    x = torch.randn(n, c, h, w)
    x = x if fmt == "channels_first" else x.permute(0, 2, 3, 1).contiguous()
    grad = torch.randn_like(x)

    def run(module, dtype, dev):
        module = module.to(device=dev, dtype=dtype)
        xi = x.to(dev, dtype).contiguous(memory_format=mem).requires_grad_()
        out = module(xi)
        out.backward(grad.to(dev, dtype))
        return [out, xi.grad] + [p.grad for p in module.parameters()]

    expected = run(ref, torch.float64, "cpu")
    names = ["out", "grad x"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    mod = MSLoRA(c, d, g, data_format=fmt, backend=backend, **OPTIONS[opts])
    mod.load_state_dict(ref.state_dict())
    t0 = time.perf_counter()
    actual = run(mod, dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    baseline = None
    if dtype not in (torch.float32, torch.float64):
        base_mod = MSLoRA(c, d, g, data_format=fmt, backend="reference", **OPTIONS[opts])
        base_mod.load_state_dict(ref.state_dict())
        baseline = run(base_mod, dtype, device)
    results = []
    for i, name in enumerate(names):
        try:
            check_close(name, actual[i], expected[i], dtype,
                        baseline=None if baseline is None else baseline[i])
            results.append((name, rel_error(actual[i], expected[i]), True))
        except AssertionError:
            results.append((name, rel_error(actual[i], expected[i]), False))
    return results, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=6, default=[2, 40, 13, 9, 24, 4],
                   metavar=("N", "C", "H", "W", "D", "G"))
    a = p.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"mslora_kernels check: torch {torch.__version__}, devices {devices}, "
          f"shape N,C,H,W,D,G = {tuple(a.shape)}")
    rows, skipped, failed = [], [], 0
    for device in devices:
        dev = torch.device(device)
        for backend in ("reference", "triton", "cuda"):
            reason = None if backend == "reference" else fused_unavailable_reason(backend, dev)
            if reason is not None:
                skipped.append((device, backend, reason))
                continue
            # 16-bit on the CPU only for the interpreted Triton kernels (the reference there
            # would be its own baseline)
            lowp = device == "cuda" or backend == "triton"
            dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if lowp else [])
            for dtype in dtypes:
                for layout in LAYOUTS:
                    for opts in OPTIONS:
                        try:
                            with no_tf32():  # the reference's cuDNN convolutions too
                                res, sec = run_case(backend, device, dtype, layout, opts, a.shape)
                        except Exception as e:  # noqa: BLE001 - reported as a failed row
                            rows.append((device, backend, str(dtype)[6:], layout, opts,
                                         float("nan"), "", f"ERROR {type(e).__name__}: {e}", 0.0))
                            failed += 1
                            continue
                        worst = max(res, key=lambda r: r[1])
                        ok = all(r[2] for r in res)
                        failed += not ok
                        rows.append((device, backend, str(dtype)[6:], layout, opts, worst[1],
                                     worst[0], "pass" if ok else "FAIL", sec))
    print(f"{'device':<6} {'backend':<9} {'dtype':<8} {'layout':<7} {'options':<7} "
          f"{'worst rel err':>13}  {'(in)':<18} {'SPEC':<5} {'time(s)':>7}")
    for r in rows:
        print(f"{r[0]:<6} {r[1]:<9} {r[2]:<8} {r[3]:<7} {r[4]:<7} {r[5]:13.2e}  {r[6]:<18} "
              f"{r[7]:<5} {r[8]:7.3f}")
    for device, backend, reason in skipped:
        print(f"{device:<6} {backend:<9} not run: {reason}")
    print(f"{len(rows) - failed} cases pass, {failed} fail")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
