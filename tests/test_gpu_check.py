"""The one-command GPU check's phase logic (scripts/gpu_check.sh), run dry: the plan is printed and
nothing is installed or run, so a mistake in the script is found here rather than in the few
minutes of a lent GPU."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def _plan(tmp_path, phases: str | None) -> tuple[int, list[str], str]:
    args = ["bash", str(SCRIPT), str(tmp_path)] + ([phases] if phases else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MSLORA_GPU_CHECK_DRY": "1"})
    steps = re.findall(r"^=== (\w+) \(", r.stdout, flags=re.M)
    return r.returncode, steps, r.stdout + r.stderr


@pytest.mark.parametrize("phases, steps", [
    ("tests", ["install", "pytest_gpu", "pytest"]),
    ("sanitize", ["install", "check", "sanitizer"]),
    ("bench", ["install", "bench", "bench_lora"]),
    ("pybench", ["install", "pybench"]),
    ("tests,sanitize", ["install", "pytest_gpu", "pytest", "check", "sanitizer"]),
    ("all", ["install", "pytest_gpu", "pytest", "check", "sanitizer", "bench", "bench_lora"]),
    (None, ["install", "pytest_gpu", "pytest", "check", "sanitizer", "bench", "bench_lora"]),
])
def test_phases_run_their_steps_in_order(tmp_path, phases, steps):
    code, got, out = _plan(tmp_path, phases)
    assert code == 0, out
    assert got == steps, out
    assert (tmp_path / "gpu_check.log").exists()


def test_tests_phase_runs_the_whole_suite_with_a_timeout(tmp_path):
    """The GPU tests, then every other test: together the whole suite, each with a timeout."""
    _, _, out = _plan(tmp_path, "tests")
    lines = [x for x in out.splitlines() if x.startswith("=== pytest")]
    assert len(lines) == 2
    assert " -m pytest tests -m gpu " in lines[0] and " -m pytest tests -m not gpu " in lines[1]
    assert all("--timeout=" in x for x in lines)


def test_unknown_phase_is_refused(tmp_path):
    code, steps, out = _plan(tmp_path, "tests,benchmark")
    assert code == 2
    assert steps == []
    assert "unknown phase 'benchmark'" in out
