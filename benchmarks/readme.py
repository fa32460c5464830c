"""Render the README's benchmark section from one results folder (never edit figures by hand).

    python -m benchmarks.readme benchmarks/results/<run>      # prints markdown to stdout

The image links are relative to the repository root, where the README lives.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import report
from .measure import REPO_ROOT


def render(results_dir: Path) -> str:
    meta, rows = report.load(results_dir)
    rel = Path(os.path.relpath(Path(results_dir).resolve(), REPO_ROOT)).as_posix()
    body = report.render_markdown(meta, rows, image_prefix=f"{rel}/", heading="###")
    return (f"<!-- rendered by `python -m benchmarks.readme {rel}`; do not edit by hand -->\n"
            f"Latest run shown: `{rel}` ({report.run_name(meta)}).\n\n{body}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__)
    p.add_argument("results_dir", help="a folder written by python -m benchmarks.run")
    args = p.parse_args(argv)
    if not (Path(args.results_dir) / report.JSON_NAME).exists():
        print(f"{args.results_dir}: no {report.JSON_NAME}; run python -m benchmarks.run first",
              file=sys.stderr)
        return 2
    print(render(Path(args.results_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
