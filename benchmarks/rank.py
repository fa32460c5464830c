"""Rank the fused backends from a GPU benchmark run, for ``backend="auto"``.

    python -m benchmarks.rank benchmarks/results/<run> [--out mslora_kernels/auto_backend.json]

Reads the run's ``results.json`` (written by ``python -m benchmarks.run``), keeps the kernel rows
of mode ``fwd+bwd`` (a training step is what users run) with status ``ok`` for the ``triton`` and
``cuda`` providers, and writes, per measured (dtype, layout, C, H, W, D), the provider with the
lower median time. ``mslora_kernels.backends.resolve_backend`` then picks, for an input, the
winner on the nearest measured shape of the same dtype and layout. The file names the run it
comes from; it is generated, never edited by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mslora_kernels.backends import RANKING_PATH

FUSED = ("triton", "cuda")
MODE = "fwd+bwd"


def rank(results: dict, source: str) -> dict:
    """The ranking file's content from a results.json's content."""
    best: dict[tuple, dict] = {}
    for r in results["rows"]:
        if (r.get("kind") != "kernel" or r.get("mode") != MODE or r.get("status") != "ok"
                or r.get("provider") not in FUSED or r.get("median_ms") is None):
            continue
        key = (r["dtype"], r["layout"], int(r["C"]), int(r["H"]), int(r["W"]), int(r["D"]))
        entry = best.setdefault(key, {"times_ms": {}})
        entry["times_ms"][r["provider"]] = float(r["median_ms"])
    rows = []
    for (dtype, layout, c, h, w, d), entry in sorted(best.items()):
        times = entry["times_ms"]
        rows.append({"dtype": dtype, "layout": layout, "C": c, "H": h, "W": w, "D": d,
                     "winner": min(times, key=times.get), "times_ms": times})
    run = results.get("run", {})
    return {"source": source, "device": run.get("device"), "date": run.get("date"),
            "commit": run.get("commit"), "mode": MODE, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a benchmark run folder holding results.json")
    ap.add_argument("--out", type=Path, default=RANKING_PATH)
    args = ap.parse_args(argv)
    results = json.loads((args.run / "results.json").read_text())
    ranking = rank(results, args.run.name)
    if not ranking["rows"]:
        print(f"{args.run}: no ok {MODE} kernel rows for {FUSED}; nothing written",
              file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(ranking, indent=1) + "\n")
    wins = {p: sum(r["winner"] == p for r in ranking["rows"]) for p in FUSED}
    print(f"{args.out}: {len(ranking['rows'])} shapes from {args.run.name} ({ranking['device']}); "
          f"wins {wins}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
