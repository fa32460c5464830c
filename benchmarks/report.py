"""Outputs of one run, written flat into one folder (at most 5 files):

- ``results.json``: ``{"run": {...}, "rows": [...]}``, every row stamped;
- ``results.csv``: the same rows, one per line, fixed columns;
- ``results.md``: the run's name, its measured rates, issue 3's goals met or missed, the tables;
- ``speedup.png``: speed-up over eager per shape and provider, one panel per mode;
- ``roofline.png``: fraction of the larger floor achieved, per shape and provider.
Everything here is rendered from the rows; nothing is typed in by hand.

    python -m benchmarks.report benchmarks/results/<run>   # re-render results.md and the plots
                                                           # from that folder's results.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

JSON_NAME, CSV_NAME, MD_NAME = "results.json", "results.csv", "results.md"
SPEEDUP_PNG, ROOFLINE_PNG = "speedup.png", "roofline.png"
OUTPUT_FILES = (JSON_NAME, CSV_NAME, MD_NAME, SPEEDUP_PNG, ROOFLINE_PNG)

STAMP_COLUMNS = ["device", "torch", "triton", "cuda", "commit", "date", "copy_gb_per_s",
                 "fma_tera_per_s"]
COLUMNS = [
    "kind", "preset", "stage", "shape", "N", "C", "H", "W", "D", "G", "K", "layout", "dtype",
    "mode", "provider", "provider_detail", "status", "error",
    "median_ms", "p20_ms", "p80_ms", "images_per_s", "gb_per_s",
    "min_bytes", "mem_floor_ms", "fmas", "fma_floor_ms", "floor_ms", "floor_bound",
    "frac_of_floor", "peak_mem_mb", "peak_mem_vs_eager", "peak_mem_note",
    "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_full_ft", "rel_err_vs_eager",
    "trainable_params", "n_input_sets", "goals", "goals_met", "goal_preset",
] + STAMP_COLUMNS
NUMBER_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "images_per_s", "gb_per_s", "mem_floor_ms",
                  "fma_floor_ms", "floor_ms", "frac_of_floor", "peak_mem_mb",
                  "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_full_ft")


# ---- machine-readable --------------------------------------------------------------------------
def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_rows(out: Path, meta: dict, rows: list[dict]) -> None:
    """results.json and results.csv (rewritten after every shape: a cut-off run keeps them)."""
    out = Path(out)
    rows = [{k: _clean(r.get(k)) for k in COLUMNS} for r in rows]
    (out / JSON_NAME).write_text(json.dumps({"run": meta, "rows": rows}, indent=1) + "\n")
    with open(out / CSV_NAME, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})


def load(out: Path) -> tuple[dict, list[dict]]:
    data = json.loads((Path(out) / JSON_NAME).read_text())
    return data["run"], data["rows"]


def write_tables(out: Path, meta: dict, rows: list[dict]) -> None:
    """results.json, results.csv and results.md (cheap: rewritten as rows come in)."""
    write_rows(out, meta, rows)
    render_tables(out)


def render_tables(out: Path) -> tuple[dict, list[dict]]:
    """results.md from the folder's results.json; returns what it read."""
    meta, rows = load(out)  # render from what was written, exactly as readme.py will
    (Path(out) / MD_NAME).write_text(render_markdown(meta, rows, image_prefix=""))
    return meta, rows


def write_all(out: Path, meta: dict, rows: list[dict]) -> None:
    """Every output: the tables and the plots."""
    write_rows(out, meta, rows)
    render_all(out)


def render_all(out: Path) -> None:
    """results.md and the plots, from the folder's results.json."""
    _, rows = render_tables(out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("[bench] matplotlib is not installed: no plots (pip install matplotlib)")
        return
    plot_speedup(rows, Path(out) / SPEEDUP_PNG)
    plot_roofline(rows, Path(out) / ROOFLINE_PNG)


# ---- markdown ----------------------------------------------------------------------------------
def _f(v, fmt="{:.3g}") -> str:
    return "—" if v is None else fmt.format(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _time_cell(r: dict) -> str:
    if r.get("status") != "ok" or r.get("median_ms") is None:
        return f"**{r.get('status', 'failed')}**: {_cell(r.get('error') or 'no number')}"
    return f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}, {r['p80_ms']:.4g}]"


def goal_summary(rows: list[dict]) -> tuple[int, int, list[str]]:
    """(met, missed, one line per missed check) over every row's goals."""
    met = missed = 0
    misses = []
    for r in rows:
        for text in filter(None, (r.get("goals") or "").split("; ")):
            if ": met" in text:
                met += 1
            else:
                missed += 1
                misses.append(f"{r['preset']} {r['shape']} {r['layout']} {r['mode']} "
                              f"{r['provider']}: {text}")
    return met, missed, misses


def run_name(meta: dict) -> str:
    return f"{meta['date'][:10]} on {meta['device']}"


def render_markdown(meta: dict, rows: list[dict], image_prefix: str = "",
                    heading: str = "#") -> str:
    """The run as markdown: name, stamps, rates, goals, kernel and end-to-end tables, plots."""
    fma = meta.get("fma_per_s")
    lines = [
        f"{heading} MSLoRA benchmark: {run_name(meta)}",
        "",
        f"Run `{meta.get('command', '?')}` at {meta['date']}, commit `{meta['commit']}`; "
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"PEFT {meta.get('peft', '?')}, Python {meta.get('python', '?')}; "
        f"{meta.get('wall_s', 0):.0f} s in all; fused backends' workspace budget "
        f"{meta.get('workspace_mb', '?')} MiB per image slice.",
        "",
        f"Measured in this run: copy bandwidth **{meta['copy_bytes_per_s'] / 1e9:.1f} GB/s** "
        f"({meta['copy_method']}); FMA rate **{_f(fma and fma / 1e12, '{:.3g}')} T/s** "
        f"({meta['fma_method']}).",
        "",
    ]
    if meta.get("ended", "complete") != "complete":
        lines += [f"> This run was {meta['ended']}: rows it did not reach are missing.", ""]
    if not meta["device"].startswith(("NVIDIA", "AMD")) and "cuda" not in meta["device"].lower():
        lines += ["> Not a GPU run: these numbers check the runner and mean nothing for the GPU.",
                  ""]
    met, missed, misses = goal_summary(rows)
    lines += [f"{heading}# Issue 3's goals", ""]
    if met + missed == 0:
        lines += ["No row of this run is one issue 3 states goals for (fused providers, bf16, "
                  "D=128, G=4, K=3,5,7, batch 64, ResNet-50 and Swin-B shapes).", ""]
    else:
        lines += [f"**{met} met, {missed} missed** of {met + missed} checks (a provider that "
                  "failed or was not measured misses its goals).", ""]
        lines += [f"- MISSED {_cell(m)}" for m in misses[:40]]
        if len(misses) > 40:
            lines.append(f"- ... and {len(misses) - 40} more (see the table)")
        lines.append("")
    kernel = [r for r in rows if r.get("kind") == "kernel"]
    if kernel:
        lines += [
            f"{heading}# Kernel rows", "",
            "Times in ms, median [p20, p80]. Floors: min bytes (read x, write out, weights; "
            "backward: read x and d, write dx, weights and their gradients) over the copy "
            "bandwidth, and the depthwise FMAs (sum k² · D · N·H·W; x2 backward) over the FMA "
            "rate. `of floor` = larger floor / median. Peak: fwd+bwd allocation beyond inputs "
            "and weights (so it includes out and dx, which every provider must produce). "
            "`fwd` is a training forward (autograd recording); `bwd` replays backward on a "
            "graph built beforehand."
            + (" Each provider's branch H(x) = out - x is checked against eager's "
               "(`rel_err_vs_eager` in the JSON): one off by more than "
               + ", ".join(f"{v:g} ({k})" for k, v in meta["branch_tolerance"].items())
               + " is recorded as failed, with no number." if meta.get("branch_tolerance")
               else "")
            + (" fp32 rows ran with TF32 off (cuBLAS and cuDNN) for every provider."
               if meta.get("fp32_rows_tf32") is False else ""), "",
            "| preset | shape | layout | dtype | mode | provider | time ms | img/s | GB/s | "
            "mem floor | FMA floor | of floor | peak MiB | x eager | x compile | goals |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in kernel:
            cells = [r["preset"], f"{r['N']}x{r['shape']}", r["layout"], r["dtype"], r["mode"],
                     r["provider"], _time_cell(r), _f(r.get("images_per_s"), "{:.4g}"),
                     _f(r.get("gb_per_s"), "{:.4g}"), _f(r.get("mem_floor_ms"), "{:.3g}"),
                     _f(r.get("fma_floor_ms"), "{:.3g}"), _f(r.get("frac_of_floor"), "{:.0%}"),
                     _f(r.get("peak_mem_mb"), "{:.4g}"), _f(r.get("speedup_vs_eager"), "{:.2f}"),
                     _f(r.get("speedup_vs_compile"), "{:.2f}"), _cell(r.get("goals") or "")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    if e2e:
        lines += [
            f"{heading}# End-to-end: one training step (fwd, bwd, AdamW), bf16 autocast", "",
            "| model | variant | time ms | img/s | peak MiB | trainable params | x mslora-eager | "
            "x full FT | detail |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in e2e:
            cells = [r["preset"], r["provider"], _time_cell(r), _f(r.get("images_per_s"), "{:.4g}"),
                     _f(r.get("peak_mem_mb"), "{:.5g}"), _f(r.get("trainable_params"), "{:,}"),
                     _f(r.get("speedup_vs_eager"), "{:.2f}"),
                     _f(r.get("speedup_vs_full_ft"), "{:.2f}"),
                     _cell(r.get("provider_detail") or "")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    lines += [f"{heading}# Plots", "",
              f"![speed-up over eager]({image_prefix}{SPEEDUP_PNG})",
              f"![fraction of the roofline]({image_prefix}{ROOFLINE_PNG})", ""]
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """A short text table for the end of a log."""
    met, missed, _ = goal_summary(rows)
    out = [f"{'preset':<10} {'shape':<14} {'layout':<17} {'dtype':<6} {'mode':<8} "
           f"{'provider':<12} {'median ms':>10} {'x eager':>8} {'of floor':>8}  status"]
    for r in rows:
        med = r.get("median_ms")
        out.append(
            f"{str(r.get('preset')):<10} {str(r.get('shape')):<14} {str(r.get('layout')):<17} "
            f"{str(r.get('dtype')):<6} {str(r.get('mode')):<8} {str(r.get('provider')):<12} "
            f"{_f(med, '{:.4g}'):>10} {_f(r.get('speedup_vs_eager'), '{:.2f}'):>8} "
            f"{_f(r.get('frac_of_floor'), '{:.0%}'):>8}  "
            f"{r.get('status')}{(': ' + r['error'][:80]) if r.get('error') else ''}")
    out.append(f"issue 3 goals: {met} met, {missed} missed")
    return "\n".join(out)


# ---- plots -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(r: dict) -> str:
    return f"{r['preset']} {r['N']}x{r['shape']}\n{r['layout']} {r['dtype']}"


PROVIDER_COLORS = {"eager": "C0", "compile": "C1", "compile-max": "C2", "triton": "C3",
                   "cuda": "C4", "triton-compile": "C5"}


def _bars(ax, rows: list[dict], providers: list[str], key: str) -> list:
    """Grouped bars of ``key`` per group label and provider; a provider without a number gets
    an 'n/a' mark in its slot instead of a bar."""
    from matplotlib.patches import Patch

    labels = list(dict.fromkeys(_label(r) for r in rows))
    width = 0.8 / max(1, len(providers))
    handles = []
    for j, prov in enumerate(providers):
        color = PROVIDER_COLORS.get(prov, f"C{5 + j}")
        xs, ys, missing = [], [], 0
        for i, lab in enumerate(labels):
            hit = [r for r in rows if _label(r) == lab and r["provider"] == prov]
            x = i - 0.4 + width * (j + 0.5)
            v = hit[0].get(key) if hit else None
            if v is None:
                if hit:
                    missing += 1
                    ax.text(x, 0.02, f"{prov}: n/a", rotation=90, ha="center", va="bottom",
                            fontsize=7, transform=ax.get_xaxis_transform(), color=color)
                continue
            xs.append(x)
            ys.append(v)
        ax.bar(xs, ys, width, color=color)
        handles.append(Patch(color=color,
                             label=prov if not missing else f"{prov} (n/a in {missing})"))
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    return handles


def _providers_in(rows, exclude=()) -> list[str]:
    return [p for p in dict.fromkeys(r["provider"] for r in rows) if p not in exclude]


MAX_PLOT_GROUPS = 24


def _plot_rows(rows: list[dict]) -> tuple[list[dict], str]:
    """The kernel rows a plot shows: all of them, or only bf16 (the goals' dtype) when there are
    more than MAX_PLOT_GROUPS shape/layout/dtype groups; the results table has every row."""
    kernel = [r for r in rows if r.get("kind") == "kernel"]
    if len({_label(r) for r in kernel}) > MAX_PLOT_GROUPS:
        bf16 = [r for r in kernel if r["dtype"] == "bf16"]
        if bf16:
            return bf16, " (bf16 rows only)"
    return kernel, ""


def _figure(plt, kernel: list[dict], modes: list[str]):
    groups = len({_label(r) for r in kernel}) or 1
    width = min(48.0, max(8.0, 1.8 * groups + 2))
    return plt.subplots(len(modes), 1, figsize=(width, 3.6 * len(modes)), squeeze=False)


def plot_speedup(rows: list[dict], path: Path) -> None:
    plt = _plt()
    kernel, note = _plot_rows(rows)
    modes = list(dict.fromkeys(r["mode"] for r in kernel)) or ["(no kernel rows)"]
    fig, axes = _figure(plt, kernel, modes)
    goal = {"fwd": 5.0, "fwd+bwd": 4.0}
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        mrows = [r for r in kernel if r["mode"] == mode]
        provs = _providers_in(mrows, exclude=("eager",))
        handles = _bars(ax, mrows, provs, "speedup_vs_eager")
        handles.append(ax.axhline(1.0, color="black", lw=0.8, label="eager"))
        if mode in goal:
            handles.append(ax.axhline(goal[mode], color="red", ls="--", lw=1,
                                      label=f"issue 3 goal {goal[mode]:g}x (bf16)"))
        ax.set_yscale("log")
        ax.set_ylabel("speed-up over eager")
        ax.set_title(f"{mode}: speed-up over the eager reference (higher is better){note}")
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roofline(rows: list[dict], path: Path) -> None:
    plt = _plt()
    kernel, note = _plot_rows(rows)
    modes = list(dict.fromkeys(r["mode"] for r in kernel)) or ["(no kernel rows)"]
    fig, axes = _figure(plt, kernel, modes)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        mrows = [r for r in kernel if r["mode"] == mode]
        handles = _bars(ax, mrows, _providers_in(mrows), "frac_of_floor")
        handles.append(ax.axhline(1.0, color="black", lw=0.8, label="the floor"))
        if mode == "fwd":
            handles.append(ax.axhline(1 / 1.5, color="red", ls="--", lw=1,
                                      label="issue 3 goal: within 1.5x"))
        ax.set_ylabel("larger floor / time")
        ax.set_title(f"{mode}: fraction of the roofline achieved (1 = at the floor){note}")
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="Re-render a run's results.md and plots from its "
                                            "results.json (e.g. a run cut off before its plots).")
    p.add_argument("results_dir", help="a folder written by python -m benchmarks.run")
    args = p.parse_args(argv)
    if not (Path(args.results_dir) / JSON_NAME).exists():
        print(f"{args.results_dir}: no {JSON_NAME}", file=sys.stderr)
        return 2
    render_all(Path(args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
