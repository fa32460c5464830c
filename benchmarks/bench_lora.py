"""Serial LoRA and MSPLoRA on one block's attention qkv: fused Triton vs eager vs PEFT LoRA.

    python benchmarks/bench_lora.py --out benchmarks/results            # GPU, bf16
    python benchmarks/bench_lora.py --device cpu --tiny --out /tmp/x     # CPU smoke run

Shapes: the qkv projection (d -> 3d) of ViT-B/16 (d = 768, 197 tokens) and of Swin-B's four
stages (d = 128..1024, 56^2..7^2 tokens per image; windows do not change the token count), batch
64. Per (shape, provider): forward and forward+backward time (``triton.testing.do_bench``,
median with 20/80 quantiles; on a CPU a plain timer, meaningless for the GPU) and the peak memory
of one forward+backward beyond inputs and weights. The input requires grad, as inside a network.

Providers: ``frozen`` (the bare Linear, no adapter: the floor), ``eager-serial`` /
``fused-serial`` (Serial LoRA r=8, reference vs Triton), ``eager-msplora`` / ``fused-msplora``
(MSPLoRA ranks (8, 4, 2)), ``peft-lora`` (PEFT's LoRA r=8 on the same Linear). A provider that
fails records its error text, never a number, and so does a fused provider whose update
(its output minus the frozen Linear's) differs from its eager twin's by more than
``DELTA_TOLERANCE`` (relative; the twins get the same adapter weights). ``--out DIR`` writes one
JSON and one markdown file.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: use this checkout's package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.measure import check_output, release, stamp, stamp_line  # noqa: E402
from mslora_kernels.lora import LoRAPair, MSPLoRALinear, SerialLoRALinear  # noqa: E402

BATCH = 64
SHAPES = [  # (name, d, tokens per image)
    ("vit_b16", 768, 197),
    ("swin_b.s1", 128, 56 * 56), ("swin_b.s2", 256, 28 * 28),
    ("swin_b.s3", 512, 14 * 14), ("swin_b.s4", 1024, 7 * 7),
]
TINY_SHAPES = [("tiny_vit", 40, 37), ("tiny_swin", 24, 49)]
TINY_BATCH = 2
SERIAL_RANK, MSP_RANKS, PEFT_RANK = 8, (8, 4, 2), 8
# fused vs eager update, relative: a 16-bit output's rounding alone puts 10-20% on the update
# (about 3% of the output for Serial LoRA), so the bound only catches a broken kernel; the GPU
# tests judge accuracy
DELTA_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.3, torch.bfloat16: 0.6}


def _nonzero_pair(pair: LoRAPair) -> LoRAPair:
    with torch.no_grad():
        pair.B.normal_(0, 0.02)
    return pair


def make_provider(name: str, base: nn.Linear) -> nn.Module:
    """The module ``name`` benchmarks, built around a copy of the frozen ``base``."""
    base = copy.deepcopy(base).requires_grad_(False)
    dev, dtype, d = base.weight.device, base.weight.dtype, base.in_features
    pair = lambda i, o, r: _nonzero_pair(LoRAPair(i, o, r, device=dev, dtype=dtype))
    if name == "frozen":
        return base
    if name in ("eager-serial", "fused-serial"):
        backend = "reference" if name.startswith("eager") else "triton"
        return SerialLoRALinear(base, pair(d, d, SERIAL_RANK), 1.0, backend=backend)
    if name in ("eager-msplora", "fused-msplora"):
        backend = "reference" if name.startswith("eager") else "triton"
        levels = [(lv, pair(d, base.out_features, r), 16.0 / r, True)
                  for lv, r in zip(("msp_global", "msp_mid", "msp_layer"), MSP_RANKS, strict=True)]
        return MSPLoRALinear(base, levels, backend=backend)
    if name == "peft-lora":
        import peft  # noqa: PLC0415 - optional

        holder = nn.Sequential()
        holder.add_module("qkv", base)
        cfg = peft.LoraConfig(r=PEFT_RANK, lora_alpha=PEFT_RANK, target_modules=["qkv"],
                              lora_dropout=0.0)
        model = peft.get_peft_model(holder, cfg, autocast_adapter_dtype=False)
        with torch.no_grad():
            model.base_model.model.qkv.lora_B["default"].weight.normal_(0, 0.02)
        return model
    raise ValueError(f"unknown provider {name!r}")


PROVIDERS = ("frozen", "eager-serial", "fused-serial", "eager-msplora", "fused-msplora",
             "peft-lora")


def _time(fn, device: str, reps: int) -> dict:
    """Median and 20/80 quantiles in ms."""
    if device == "cuda":
        import triton.testing

        med, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median": med, "q20": q20, "q80": q80, "timer": "triton.testing.do_bench"}
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(ts, n=10) if len(ts) > 1 else ts * 9
    return {"median": statistics.median(ts), "q20": qs[1], "q80": qs[7],
            "timer": "time.perf_counter (CPU: says nothing about the GPU)"}


def measure(mod: nn.Module, x: torch.Tensor, device: str, reps: int) -> dict:
    g = torch.randn(*x.shape[:-1], mod(x).shape[-1], device=x.device, dtype=x.dtype)
    params = [p for p in mod.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            mod(x)

    def fwd_bwd():
        y = mod(x)
        torch.autograd.grad(y, [x] + params, g)

    out = {"fwd_ms": _time(fwd, device, reps), "fwd_bwd_ms": _time(fwd_bwd, device, reps),
           "trainable_params": sum(p.numel() for p in params)}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        out["peak_mem_mb"] = None
    return out


def check_update(prov: str, mod: nn.Module, x: torch.Tensor, y0: torch.Tensor,
                 eager: dict) -> float | None:
    """The relative error of a fused provider's update ``mod(x) - y0`` against its eager twin's
    (kept in ``eager`` by kind); raises if beyond DELTA_TOLERANCE. None for the others."""
    kind = prov.split("-")[-1]
    if kind not in ("serial", "msplora"):
        return None
    with torch.no_grad():
        delta = mod(x).float() - y0
    if prov.startswith("eager"):
        eager[kind] = delta
        return None
    ref = eager.get(kind)
    if ref is None:
        return None
    return check_output(f"its {kind} update", delta, ref,
                        DELTA_TOLERANCE[x.dtype])


def run(device: str, tiny: bool, dtype: torch.dtype, providers, reps: int,
        on_row=None) -> list[dict]:
    """Every (shape, provider) row; ``on_row(rows so far)`` after each (a cut-off run keeps
    what it measured)."""
    meta = stamp(torch.device(device))
    shapes, batch = (TINY_SHAPES, TINY_BATCH) if tiny else (SHAPES, BATCH)
    rows = []
    for shape, d, tokens in shapes:
        torch.manual_seed(0)
        base = nn.Linear(d, 3 * d).to(device, dtype)
        x = torch.randn(batch, tokens, d, device=device, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            y0 = base(x).float()
        eager: dict = {}
        for prov in providers:
            row = {**meta, "shape": shape, "d": d, "tokens": batch * tokens, "batch": batch,
                   "dtype": str(dtype).removeprefix("torch."), "provider": prov, "error": None}
            try:
                torch.manual_seed(1)  # eager-X and fused-X get the same adapter weights
                mod = make_provider(prov, base)
                row["update_rel_err_vs_eager"] = check_update(prov, mod, x, y0, eager)
                row.update(measure(mod, x, device, reps))
            except Exception as e:  # noqa: BLE001 - a failure is a row, never a number
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            release(device)
        del y0, eager
    return rows


def markdown(rows: list[dict]) -> str:
    m = rows[0]
    lines = [f"# LoRA-family qkv projection, forward+backward ({m['dtype']})", "",
             stamp_line(m), "",
             "| shape | d | tokens | provider | fwd ms (q20-q80) | fwd+bwd ms (q20-q80) | "
             "x eager | peak MiB | trainable |",
             "|---|---|---|---|---|---|---|---|---|"]
    eager = {(r["shape"], r["provider"].split("-")[1]): r for r in rows
             if r["provider"].startswith("eager") and not r["error"]}
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['shape']} | {r['d']} | {r['tokens']} | {r['provider']} | "
                         f"failed: {r['error']} | | | | |")
            continue
        f, fb = r["fwd_ms"], r["fwd_bwd_ms"]
        kind = r["provider"].split("-")[-1]
        e = eager.get((r["shape"], kind))
        speed = f"{e['fwd_bwd_ms']['median'] / fb['median']:.2f}x" if e and r is not e else ""
        mem = f"{r['peak_mem_mb']:.1f}" if r["peak_mem_mb"] is not None else "n/a"
        lines.append(f"| {r['shape']} | {r['d']} | {r['tokens']} | {r['provider']} | "
                     f"{f['median']:.3f} ({f['q20']:.3f}-{f['q80']:.3f}) | "
                     f"{fb['median']:.3f} ({fb['q20']:.3f}-{fb['q80']:.3f}) | {speed} | {mem} | "
                     f"{r['trainable_params']} |")
    lines += ["", f"Timer: {m.get('fwd_ms', {}).get('timer', 'see rows')}. Per block: one "
              "attention's qkv Linear (d -> 3d) with its adapter; the input requires grad."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="default bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--reps", type=int, default=5, help="CPU timer repetitions")
    p.add_argument("--out", type=Path, default=None, help="write one JSON and one .md here")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    write = None
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        tag = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        stem = f"lora_{a.device}{'_tiny' if a.tiny else ''}_{tag}"

        def write(rows):  # rewritten after every row
            (a.out / f"{stem}.json").write_text(json.dumps({"rows": rows}, indent=1))
            (a.out / f"{stem}.md").write_text(markdown(rows))
    print(markdown(run(a.device, a.tiny, dtype, a.providers, a.reps, on_row=write)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
