"""The MSLoRA benchmark runner.

    python -m benchmarks.run --quick [--out DIR]         # what the GPU check runs (a few minutes)
    python -m benchmarks.run --presets resnet50 --dtypes bf16 --layouts channels_first
    python -m benchmarks.run --device cpu --tiny         # CPU smoke run: numbers mean nothing

For every selected shape, layout and dtype, every provider (eager reference, torch.compile of it,
Triton, CUDA; on request, torch.compile of the Triton module) is timed in each mode (fwd, bwd,
fwd+bwd) on the same weights and inputs. Rows give median/p20/p80, images/s, effective GB/s, both
roofline floors with rates measured in the same run, the fraction of the larger floor, fwd+bwd peak
memory, speed-ups over eager and torch.compile and, where issue 3 states goals, whether each is
met. A provider that is unavailable or fails records the text of the failure and no number. Outputs
(flat, 5 files): results.json, results.csv, results.md, speedup.png, roofline.png, under ``--out``
(default ``benchmarks/results/<date>_<device>``). JSON and CSV are rewritten after every shape, so
an interrupted run keeps what it measured.

Timing conventions: ``fwd`` is a training forward (inputs and weights require grad, so each
provider saves what its backward needs); ``bwd`` is ``out.backward(d, retain_graph=True)`` on a
graph built beforehand; ``fwd+bwd`` is both. Gradients are reset to None before each call. Inputs
rotate among enough sets to exceed the L2 cache, and ``do_bench`` flushes L2 before every call.
The module runs in the benchmark dtype (weights cast once, no autocast).
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from mslora_kernels.testing import no_tf32
from mslora_kernels.workspace import workspace_budget

from . import e2e, floors, measure, presets, providers, report

DEFAULT_E2E_BATCH = 64
# --quick: work not started by then is recorded as skipped (the GPU check passes its own
# --time-budget, a minute under its step's limit, for the imports, the last row begun and the
# plots).
QUICK_BUDGET_S = 210.0
KERNEL_SHARE = 0.7  # of the budget, for kernel shapes when end-to-end rows follow
# A provider's adapter branch H(x) = out - x against eager's, relative error (norm): beyond this
# its output is wrong and its rows are failures, with no number. The branch (about 6% of x here),
# not out, so that a wrong branch is not hidden under x; eager's own 16-bit rounding of out puts
# about 3% (bf16) on the branch, so the bound only catches a broken kernel: the GPU tests judge
# accuracy.
BRANCH_TOLERANCE = {"fp32": 1e-3, "fp16": 0.05, "bf16": 0.2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one shape per preset, fwd and fwd+bwd, bf16, plus the end-to-end rows")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke sizes (N=2, C=40, 13x9, D=24): checks the runner, not speed")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--presets", default=",".join(presets.PRESETS),
                   help=f"comma-separated, from {list(presets.PRESETS)}")
    p.add_argument("--stages", default="", help="1-based stages to keep, e.g. 1,3 (default all)")
    p.add_argument("--batch", type=int, default=None,
                   help="N (default: 64; the detection preset keeps 2)")
    p.add_argument("--rank", type=int, default=None, help="D (default 128; 24 with --tiny)")
    p.add_argument("--groups", type=int, default=presets.DEFAULT_GROUPS, help="G (default 4)")
    p.add_argument("--kernel-sizes", default="3,5,7", help="K (default 3,5,7)")
    p.add_argument("--modes", default=None, help=f"from {list(floors.MODES)} (default all)")
    p.add_argument("--dtypes", default=None,
                   help="from bf16,fp16,fp32 (default all; bf16 with --quick; fp32 with --tiny)")
    p.add_argument("--layouts", default=None,
                   help=f"from {list(presets.LAYOUTS)} (default all; --quick: per preset)")
    p.add_argument("--providers", default=None,
                   help=f"from {list(providers.PROVIDERS)} (default "
                        f"{','.join(providers.DEFAULT_PROVIDERS)})")
    p.add_argument("--max-autotune", action="store_true",
                   help="also time torch.compile(mode='max-autotune-no-cudagraphs') (slow to "
                        "compile)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; aot_eager for quick CPU checks)")
    p.add_argument("--e2e", default=None,
                   help="end-to-end models, from "
                        f"{list(e2e.MODELS)}, or 'none' (default: both with --quick or a full "
                        "run on CUDA; none with --tiny)")
    p.add_argument("--e2e-batch", type=int, default=DEFAULT_E2E_BATCH)
    p.add_argument("--e2e-variants", default=",".join(e2e.VARIANTS))
    p.add_argument("--e2e-steps", type=int, default=None,
                   help="timed training steps per variant (default 10; 5 with --quick)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--cpu-reps", type=int, default=5, help="timed calls per row on a CPU")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; work not started within it is recorded as skipped "
                        f"(default {QUICK_BUDGET_S:.0f} with --quick, none otherwise)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/"
                                               "<date>_<device>)")
    return p.parse_args(argv)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _pick(text: str | None, allowed, default, what: str) -> list[str]:
    chosen = _csv(text) if text else list(default)
    bad = [c for c in chosen if c not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")
    return chosen


def plan(args) -> dict:
    """What to run: groups of (shape, layout, dtype), modes, providers, e2e models."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    try:
        kernel_sizes = tuple(int(k) for k in _csv(args.kernel_sizes))
    except ValueError as e:
        raise SystemExit(f"--kernel-sizes must be integers: {e}") from e
    rank = args.rank or (presets.TINY_RANK if args.tiny else presets.DEFAULT_RANK)
    modes = _pick(args.modes, floors.MODES,
                  ("fwd", "fwd+bwd") if args.quick else floors.MODES, "modes")
    dtypes = _pick(args.dtypes, providers.DTYPES,
                   ("bf16",) if args.quick else ("fp32",) if args.tiny else providers.DTYPES,
                   "dtypes")
    default_prov = list(providers.DEFAULT_PROVIDERS)
    if args.max_autotune:
        default_prov.append("compile-max")
    provs = _pick(args.providers, providers.PROVIDERS, default_prov, "providers")
    stages = [int(s) for s in _csv(args.stages)]
    groups = []  # (Shape, layout, dtype name, goals stated for the preset)
    if args.tiny:
        layouts = _pick(args.layouts, presets.LAYOUTS, presets.LAYOUTS, "layouts")
        for shape in presets.shapes_of(presets.TINY, stages or None, args.batch):
            groups += [(shape, lay, dt, False) for dt in dtypes for lay in layouts]
    elif args.quick:
        for name, stage, layouts in presets.QUICK:
            if name not in _csv(args.presets):
                continue
            if args.layouts:
                layouts = _pick(args.layouts, presets.LAYOUTS, (), "layouts")
            for shape in presets.shapes_of(presets.PRESETS[name], [stage], args.batch):
                groups += [(shape, lay, dt, presets.PRESETS[name].goals)
                           for dt in dtypes for lay in layouts]
    else:
        names = _pick(args.presets, presets.PRESETS, (), "presets")
        layouts = _pick(args.layouts, presets.LAYOUTS, presets.LAYOUTS, "layouts")
        for name in names:
            pr = presets.PRESETS[name]
            keep = [s for s in stages if s <= len(pr.stages)] or None
            for shape in presets.shapes_of(pr, keep, args.batch):
                groups += [(shape, lay, dt, pr.goals) for dt in dtypes for lay in layouts]
    if args.e2e is None:
        e2e_models = list(e2e.MODELS) if (args.quick or device.type == "cuda") and not args.tiny \
            else []
    elif args.e2e == "none":
        e2e_models = []
    else:
        e2e_models = _pick(args.e2e, e2e.MODELS, (), "end-to-end models")
    budget = args.time_budget if args.time_budget is not None else (
        QUICK_BUDGET_S if args.quick else None)
    return {"device": device, "rank": rank, "groups_g": args.groups, "kernel_sizes": kernel_sizes,
            "modes": modes, "providers": provs, "groups": groups, "e2e_models": e2e_models,
            "e2e_variants": _pick(args.e2e_variants, e2e.VARIANTS, (), "end-to-end variants"),
            "budget": budget}


# ---- one kernel group --------------------------------------------------------------------------
def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    text = re.sub(r"\s+", " ", text)
    return text[:500] + (" ..." if len(text) > 500 else "")


def _new_row(shape, layout, dtype, mode, provider, p, goal_preset) -> dict:
    return {"kind": "kernel", "preset": shape.preset, "stage": shape.stage, "shape": shape.label,
            "N": shape.n, "C": shape.c, "H": shape.h, "W": shape.w, "D": p["rank"],
            "G": p["groups_g"], "K": ",".join(map(str, p["kernel_sizes"])), "layout": layout,
            "dtype": dtype, "mode": mode, "provider": provider, "goal_preset": goal_preset,
            "status": "ok", "error": ""}


def n_input_sets(x_bytes: int, device: torch.device) -> int:
    """Input sets to rotate among: together at least twice the L2 (2..32; 2 on a CPU)."""
    if device.type != "cuda":
        return 2
    return max(2, min(32, math.ceil(2 * measure.l2_bytes(device) / max(1, 2 * x_bytes))))


def measure_group(shape, layout, dtype_name, goal_preset, p, rates, args,
                  done: list[dict] | None = None) -> list[dict]:
    """Every provider x mode row of one (shape, layout, dtype), each appended to ``done`` once
    finished, so that a run stopped in the middle of a group keeps the rows it finished."""
    rows = [] if done is None else done
    device, dtype = p["device"], providers.DTYPES[dtype_name]
    base = providers.make_base(shape.c, p["rank"], p["groups_g"], p["kernel_sizes"], layout,
                               dtype, device)
    elem = torch.empty((), dtype=dtype).element_size()
    nsets = n_input_sets(shape.n * shape.c * shape.h * shape.w * elem, device)
    xs = [providers.make_input(shape.n, shape.c, shape.h, shape.w, layout, dtype, device, seed=i)
          for i in range(nsets)]
    ds = [torch.randn_like(x).detach() for x in xs]
    with torch.no_grad():
        ref_branch = base(xs[0]).float() - xs[0].float()
    tol = BRANCH_TOLERANCE[dtype_name]
    for prov in p["providers"]:
        prov_rows = {m: _new_row(shape, layout, dtype_name, m, prov, p, goal_preset)
                     for m in p["modes"]}
        reason = providers.unavailable(prov, device)
        if reason:
            for r in prov_rows.values():
                r.update(status="unavailable", error=reason)
            rows += prov_rows.values()
            continue
        try:
            fn, detail = providers.build(prov, base, args.compile_backend)
            out = fn(xs[0])  # first call: compiles where it must, and checks the output
            rel = measure.check_output(f"its branch H(x) = out - x in {dtype_name}",
                                       out.detach().float() - xs[0].float(), ref_branch, tol)
            del out
        except Exception as e:  # the provider failed: its rows say how, with no number
            for r in prov_rows.values():
                r.update(status="failed", error=_error_text(e))
            rows += prov_rows.values()
            continue
        params = [q for q in fn.parameters() if q.requires_grad]
        resets = xs + params
        for mode, r in prov_rows.items():
            r.update(provider_detail=detail, rel_err_vs_eager=rel, n_input_sets=nsets)
            before = dict(r)
            try:
                if mode == "bwd" and prov in providers.COMPILED:
                    med, p20, p80 = _time_compiled_bwd(prov, base, xs, ds, device, args)
                    r["provider_detail"] += "; bwd: " + DONATED_NOTE
                else:
                    med, p20, p80 = _time_mode(fn, mode, xs, ds, resets, device, args)
                r.update(median_ms=med, p20_ms=p20, p80_ms=p80)
                _derive(r, shape, p, elem, rates)
                if mode == "fwd+bwd":
                    peak, note = measure.peak_memory_mb(
                        partial(_fwd_bwd_once, fn, xs[-1], ds[-1]), device, reset=resets)
                    r.update(peak_mem_mb=peak, peak_mem_note=note)
            except Exception as e:  # no number from a failed mode: what it measured goes
                r.clear()
                r.update(before, status="failed", error=f"{mode}: {_error_text(e)}")
                measure.release(device)
            rows.append(r)
        for t in resets:
            t.grad = None
    _compare(rows)
    measure.release(device)
    return rows


def _failed_group(shape, layout, dtype_name, goal_preset, p, e: BaseException) -> list[dict]:
    """Every provider x mode row of a group whose set-up (module, inputs, eager output) failed:
    failures, with no number, so the run goes on to the next group."""
    rows = []
    for prov in p["providers"]:
        for mode in p["modes"]:
            r = _new_row(shape, layout, dtype_name, mode, prov, p, goal_preset)
            r.update(status="failed", error=f"group set-up: {_error_text(e)}")
            rows.append(r)
    _compare(rows)
    measure.release(p["device"])
    return rows


CUT_OFF = "the run was stopped (its time limit) before this row was finished"


def _unfinished_rows(done: list[dict], shape, layout, dtype_name, goal_preset, p) -> list[dict]:
    """The rows of a group that a stopped run did not finish, as "cut off" rows with no number."""
    have = {(r["provider"], r["mode"]) for r in done}
    rows = []
    for prov in p["providers"]:
        for mode in p["modes"]:
            if (prov, mode) not in have:
                rows.append(_new_row(shape, layout, dtype_name, mode, prov, p, goal_preset))
                rows[-1].update(status="cut off", error=CUT_OFF)
    return rows


def _fwd_bwd_once(fn, x, d) -> None:
    fn(x).backward(d)


def _time_mode(fn, mode, xs, ds, resets, device, args):
    idx = itertools.cycle(range(len(xs)))
    kw = {"grad_to_none": resets, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
          "cpu_reps": args.cpu_reps}
    if mode == "fwd":
        return measure.bench(lambda: fn(xs[next(idx)]), device, **kw)
    fn(xs[0]).backward(ds[0])  # un-timed: a compiled provider compiles its backward here
    if mode == "fwd+bwd":
        def fwd_bwd():
            i = next(idx)
            fn(xs[i]).backward(ds[i])
        return measure.bench(fwd_bwd, device, **kw)
    outs = [fn(x) for x in xs]  # bwd: graphs built once, replayed with retain_graph

    def bwd():
        i = next(idx)
        outs[i].backward(ds[i], retain_graph=True)
    try:
        return measure.bench(bwd, device, **kw)
    finally:
        outs.clear()


DONATED_NOTE = "compiled again with donated_buffer=False, which retain_graph needs"


def _time_compiled_bwd(prov, base, xs, ds, device, args):
    """bwd of a compiled provider: replaying ``backward(retain_graph=True)`` needs a backward
    compiled without donated buffers, so it gets a compile of its own."""
    cfg = torch._functorch.config
    ctx = cfg.patch(donated_buffer=False) if hasattr(cfg, "donated_buffer") else nullcontext()
    with ctx:
        fn, _ = providers.build(prov, base, args.compile_backend)
        fn(xs[0])
        resets = xs + [q for q in fn.parameters() if q.requires_grad]
        try:
            return _time_mode(fn, "bwd", xs, ds, resets, device, args)
        finally:
            for t in resets:
                t.grad = None


def _derive(r: dict, shape, p, elem: int, rates: dict) -> None:
    f = floors.floors(r["mode"], shape.n, shape.c, shape.h, shape.w, p["rank"], p["groups_g"],
                      p["kernel_sizes"], elem, rates.get("copy_bytes_per_s"),
                      rates.get("fma_per_s"))
    r.update(f)
    sec = r["median_ms"] * 1e-3
    r["images_per_s"] = shape.n / sec
    r["gb_per_s"] = f["min_bytes"] / sec / 1e9
    r["frac_of_floor"] = f["floor_ms"] / r["median_ms"] if f["floor_ms"] else None


def _median(r: dict) -> float | None:
    """A row's median time, only if the row succeeded."""
    return r.get("median_ms") if r.get("status") == "ok" else None


def _compare(rows: list[dict]) -> None:
    """Speed-ups over eager and torch.compile, then issue 3's goals, within one group."""
    by_mode: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], {})[r["provider"]] = r
    eager_fb = by_mode.get("fwd+bwd", {}).get("eager", {})
    peak_eager = eager_fb.get("peak_mem_mb") if eager_fb.get("status") == "ok" else None
    for mode_rows in by_mode.values():
        eager = _median(mode_rows.get("eager", {}))
        comp = _median(mode_rows.get("compile", {}))
        for r in mode_rows.values():
            med = _median(r)
            r["speedup_vs_eager"] = eager / med if med and eager else None
            r["speedup_vs_compile"] = comp / med if med and comp else None
            if r.get("peak_mem_mb") is not None and peak_eager:
                r["peak_mem_vs_eager"] = r["peak_mem_mb"] / peak_eager
            goals = floors.evaluate_goals(r, peak_eager)
            r["goals"] = "; ".join(g["text"] for g in goals)
            r["goals_met"] = all(g["met"] for g in goals) if goals else None


# ---- end-to-end --------------------------------------------------------------------------------
def measure_e2e(model_key: str, variant: str, p, args) -> dict:
    device = p["device"]
    row = {"kind": "e2e", "preset": model_key, "shape": f"3@{e2e.IMAGE_SIZE}x{e2e.IMAGE_SIZE}",
           "N": args.e2e_batch, "C": 3, "H": e2e.IMAGE_SIZE, "W": e2e.IMAGE_SIZE,
           "layout": "channels_first", "dtype": "bf16-autocast", "mode": "train-step",
           "provider": variant, "status": "ok", "error": ""}
    if device.type != "cuda":
        row.update(status="skipped", error="end-to-end rows run on a CUDA device only")
        return row
    model = None
    try:
        model, detail = e2e.build_model(model_key, variant, device)
        row["provider_detail"] = detail
        steps = args.e2e_steps or (5 if args.quick else 10)
        row.update(e2e.time_train_step(model, args.e2e_batch, device, warmup=2 if args.quick
                                       else 3, steps=steps))
        row["images_per_s"] = args.e2e_batch / (row["median_ms"] * 1e-3)
    except e2e.Unavailable as e:
        row.update(status="unavailable", error=str(e))
    except Exception as e:
        row.update(status="failed", error=_error_text(e))
    finally:
        del model
        measure.release(device)
    return row


def _compare_e2e(rows: list[dict]) -> None:
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["preset"], {})[r["provider"]] = r
    for mrows in by_model.values():
        eager = _median(mrows.get("mslora-eager", {}))
        full = _median(mrows.get("full-ft", {}))
        for r in mrows.values():
            med = _median(r)
            r["speedup_vs_eager"] = eager / med if med and eager else None
            r["speedup_vs_full_ft"] = full / med if med and full else None


# ---- main --------------------------------------------------------------------------------------
def default_out_dir(meta: dict) -> Path:
    """benchmarks/results/<date>_<device>, with _2, _3, ... when that run already exists (every
    run is kept)."""
    dev = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-")
    base = measure.REPO_ROOT / "benchmarks" / "results" / f"{meta['date'][:10]}_{dev}"
    out, k = base, 1
    while (out / report.JSON_NAME).exists():
        k += 1
        out = base.with_name(f"{base.name}_{k}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    p = plan(args)
    threads = torch.get_num_threads()
    if p["device"].type == "cpu":
        # CPU smoke runs: one thread. On a shared machine, OpenMP threads that wait on each other
        # turn a tiny call from 0.5 ms into hundreds.
        torch.set_num_threads(1)
    # A time limit's SIGTERM (the GPU check's `timeout`) ends the run through its finally
    # blocks, so that the rows measured so far and their tables and plots are written.
    main_thread = threading.current_thread() is threading.main_thread()  # signal's rule
    old_term = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        return _main(args, p, sys.argv[1:] if argv is None else list(argv))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
        torch.set_num_threads(threads)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _main(args, p, argv: list[str]) -> int:
    device = p["device"]
    t_start = time.monotonic()
    meta = measure.stamp(device)
    out = Path(args.out) if args.out else default_out_dir(meta)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {measure.stamp_line(meta)}", flush=True)
    if device.type != "cuda":
        print("[bench] NOTE: not a CUDA device; these numbers check the runner and mean nothing "
              "for the GPU", flush=True)
    rates = measure.copy_bandwidth(device)
    rates.update(measure.fma_rate(device))
    fma = rates["fma_per_s"]
    print(f"[bench] copy bandwidth {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s; FMA rate "
          f"{fma / 1e12 if fma else float('nan'):.3g} T/s ({rates['fma_method']})", flush=True)
    meta.update(rates)
    meta.update(command="python -m benchmarks.run " + " ".join(argv),
                l2_bytes=measure.l2_bytes(device), compile_backend=args.compile_backend,
                cpu_threads=torch.get_num_threads(),
                workspace_mb=workspace_budget() >> 20,
                cudnn_benchmark=torch.backends.cudnn.benchmark,
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                fp32_rows_tf32=False, branch_tolerance=BRANCH_TOLERANCE)
    stamp_cols = {k: meta[k] for k in ("device", "torch", "triton", "cuda", "commit", "date")}
    stamp_cols["copy_gb_per_s"] = rates["copy_bytes_per_s"] / 1e9
    stamp_cols["fma_tera_per_s"] = fma / 1e12 if fma else None

    rows: list[dict] = []

    def over_budget(share: float = 1.0) -> bool:
        """Past ``share`` of the time budget? Kernel shapes may use the first KERNEL_SHARE of it,
        so that the end-to-end rows keep some."""
        return p["budget"] is not None and time.monotonic() - t_start > share * p["budget"]

    e2e_rows: list[dict] = []
    meta["ended"] = "cut off (an exception or SIGTERM: see the log)"
    try:
        _run_groups(p, args, rates, meta, stamp_cols, out, rows, over_budget)
        _run_e2e(p, args, meta, stamp_cols, out, rows, e2e_rows, over_budget)
        meta["ended"] = "complete"
    finally:
        _compare_e2e(e2e_rows)
        rows += [{**r, **stamp_cols} for r in e2e_rows]
        meta["wall_s"] = time.monotonic() - t_start
        report.write_all(out, meta, rows)
        print(report.summary(rows), flush=True)
        print(f"[bench] {meta['ended']}: wrote "
              f"{', '.join(sorted(f.name for f in out.iterdir()))} to {out} "
              f"in {meta['wall_s']:.0f} s", flush=True)
    return 0


def _run_groups(p, args, rates, meta, stamp_cols, out, rows, over_budget) -> None:
    """The kernel rows, group by group; the tables are rewritten after each group."""
    for shape, layout, dtype_name, goal_preset in p["groups"]:
        if over_budget(KERNEL_SHARE if p["e2e_models"] else 1.0):
            for prov in p["providers"]:
                for mode in p["modes"]:
                    r = _new_row(shape, layout, dtype_name, mode, prov, p, goal_preset)
                    r.update(status="skipped",
                             error=f"time budget for kernel rows ({p['budget']:.0f} s run) spent")
                    _compare([r])
                    rows.append({**r, **stamp_cols})
            continue
        t0 = time.monotonic()
        group: list[dict] = []
        try:
            # fp32 rows: TF32 off, so that every provider computes what SPEC's fp32 contract
            # asks (the fused kernels never use TF32 for it; cuDNN would, by default, for eager)
            with no_tf32() if dtype_name == "fp32" else nullcontext():
                measure_group(shape, layout, dtype_name, goal_preset, p, rates, args, group)
        except Exception as e:  # the group's set-up failed (e.g. a CUDA error left by a kernel)
            group = _failed_group(shape, layout, dtype_name, goal_preset, p, e)
        except BaseException:  # stopped (SIGTERM's SystemExit, Ctrl-C): keep what it finished
            group += _unfinished_rows(group, shape, layout, dtype_name, goal_preset, p)
            _compare(group)
            raise
        finally:
            rows += [{**r, **stamp_cols} for r in group]
        print(f"[bench] {shape.long_label} {layout} {dtype_name}: "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        report.write_tables(out, meta, rows)


def _run_e2e(p, args, meta, stamp_cols, out, rows, e2e_rows, over_budget) -> None:
    """The end-to-end rows; the tables are rewritten after each."""
    for model_key in p["e2e_models"]:
        for variant in p["e2e_variants"]:
            if over_budget():
                r = {"kind": "e2e", "preset": model_key, "provider": variant, "mode": "train-step",
                     "status": "skipped", "error": f"time budget of {p['budget']:.0f} s spent"}
            else:
                r = measure_e2e(model_key, variant, p, args)
                print(f"[bench] e2e {model_key} {variant}: {r['status']}", flush=True)
            e2e_rows.append(r)
            report.write_tables(out, meta, rows + [{**r, **stamp_cols} for r in e2e_rows])


if __name__ == "__main__":
    sys.exit(main())
