"""The one-command GPU check's plan (scripts/gpu_check.sh), run dry: the plan is printed and nothing
is installed or run, each step taken to use its whole limit, so a mistake in the script, or a plan
that cannot fit the lent machine's time, is found here rather than in its few minutes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"
ROOMY = "5000"  # a budget no plan fills


def _plan(tmp_path, phases: str | None, budget: str | None = ROOMY, **env):
    args = ["bash", str(SCRIPT), str(tmp_path)] + ([phases] if phases else [])
    # no wheels unless a test brings them (a checkout's own wheelhouse/ must not change a plan)
    env = {**os.environ, "MSLORA_GPU_CHECK_DRY": "1",
           "MSLORA_WHEELHOUSE": str(tmp_path / "no-wheelhouse"), **env}
    env.pop("MSLORA_GPU_BUDGET_S", None)
    if budget is not None:
        env["MSLORA_GPU_BUDGET_S"] = budget
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    out = r.stdout + r.stderr
    steps = re.findall(r"^=== (\w+) \(", r.stdout, flags=re.M)
    limits = {m[0]: int(m[1]) for m in re.findall(r"^=== (\w+) \(.*limit (\d+)s", out, re.M)}
    skipped = re.findall(r"^=== (\w+) skipped", out, flags=re.M)
    return r.returncode, steps, limits, skipped, out


@pytest.mark.parametrize("phases, steps", [
    ("tests", ["install", "pytest_gpu"]),
    ("sanitize", ["install", "sanitizer", "check"]),
    ("bench", ["install", "bench", "bench_lora", "profile"]),
    ("suite", ["install", "pytest"]),
    ("pybench", ["install", "pybench"]),
    ("bench,tests", ["install", "pytest_gpu", "bench", "bench_lora", "profile"]),
    ("all", ["install", "pytest_gpu", "sanitizer", "bench", "check", "bench_lora",
             "profile"]),
    (None, ["install", "pytest_gpu", "sanitizer", "bench", "check", "bench_lora",
            "profile"]),
])
def test_phases_run_their_steps_in_priority_order(tmp_path, phases, steps):
    code, got, _, skipped, out = _plan(tmp_path, phases)
    assert code == 0, out
    assert got == steps and skipped == [], out
    assert (tmp_path / "gpu_check.log").exists()


def test_default_budget_fits_the_lease_and_keeps_the_essential_steps(tmp_path):
    """15 device minutes, a start included: the default budget (480 s) runs the GPU tests, the
    sanitizer and the benchmarks even if every step runs to its limit; what no longer fits is
    skipped by name, and the exit status (3) says the check is incomplete."""
    code, got, limits, skipped, out = _plan(tmp_path, None, budget=None)
    assert got[:4] == ["install", "pytest_gpu", "sanitizer", "bench"], out
    assert sum(limits.values()) <= 480, limits
    assert limits["pytest_gpu"] >= 60 and limits["sanitizer"] >= 45 and limits["bench"] >= 90
    assert skipped == ["check", "bench_lora", "profile"], out
    assert "check skipped: 0s of the 480s budget left" in out
    assert code == 3, out
    assert re.search(r"^not done or failed, by phase: sanitize,bench$", out, re.M), out


def test_a_step_never_gets_more_than_the_budget_left(tmp_path):
    code, got, limits, skipped, out = _plan(tmp_path, "tests,bench", budget="200")
    assert sum(limits.values()) <= 200, limits
    assert got == ["install", "pytest_gpu", "bench"] and skipped == ["bench_lora", "profile"], out
    assert code == 3


@pytest.mark.parametrize("phases, steps", [
    ("bench", ["install", "peft", "bench", "bench_lora", "profile"]),
    ("all", ["install", "pytest_gpu", "sanitizer", "peft", "bench", "check", "bench_lora",
             "profile"]),
    ("tests,sanitize", ["install", "pytest_gpu", "sanitizer", "check"]),
])
def test_carried_wheels_install_peft_before_the_benchmarks(tmp_path, phases, steps):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    code, got, limits, skipped, out = _plan(tmp_path, phases, MSLORA_WHEELHOUSE=str(wheels))
    assert code == 0 and got == steps and skipped == [], out
    if "peft" in steps:
        assert limits["peft"] == 60
        assert re.search(r"-m pip install .*--no-index --find-links \S*wheels peft$", out, re.M)


def test_peft_never_takes_the_essential_steps_floors(tmp_path):
    """At the default budget, with every step at its limit, the optional PEFT install is what
    gives way: the GPU tests, the sanitizer and the benchmarks keep the time they have without
    it."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _, got, limits, skipped, out = _plan(tmp_path, None, budget=None,
                                         MSLORA_WHEELHOUSE=str(wheels))
    _, _, without, _, _ = _plan(tmp_path, None, budget=None)
    assert got[:4] == ["install", "pytest_gpu", "sanitizer", "bench"], out
    assert skipped[0] == "peft" and "peft skipped" in out
    assert limits == without
    # with time to spare after the earlier steps' limits, it runs and leaves bench its floor
    _, got, limits, _, out = _plan(tmp_path, None, budget="720", MSLORA_WHEELHOUSE=str(wheels))
    assert got[:5] == ["install", "pytest_gpu", "sanitizer", "peft", "bench"], out
    assert limits["peft"] == 60 and limits["bench"] == 90, limits


def test_bench_time_budget_follows_its_limit(tmp_path):
    _, _, limits, _, out = _plan(tmp_path, "bench")
    assert limits["bench"] == 300
    assert re.search(r"benchmarks\.run --quick --time-budget 240 ", out), out


def test_gpu_tests_selection_and_suite_have_timeouts(tmp_path):
    _, _, _, _, out = _plan(tmp_path, "tests,suite",
                            MSLORA_GPU_TESTS="tests/test_cuda_mslora.py -k graph")
    lines = [x for x in out.splitlines() if x.startswith("=== pytest")]
    assert len(lines) == 2
    assert " -m pytest tests/test_cuda_mslora.py -k graph -m gpu " in lines[0]
    assert " -m pytest tests -m not gpu " in lines[1]
    assert all("--timeout=" in x for x in lines)


@pytest.mark.parametrize("phases, budget, message", [
    ("tests,benchmark", ROOMY, "unknown phase 'benchmark'"),
    ("tests", "8m", "MSLORA_GPU_BUDGET_S must be whole seconds, got '8m'"),
])
def test_bad_arguments_are_refused(tmp_path, phases, budget, message):
    code, steps, _, _, out = _plan(tmp_path, phases, budget=budget)
    assert code == 2
    assert steps == []
    assert message in out


def test_every_file_with_gpu_tests_has_its_place_in_the_gpu_order():
    """conftest orders the GPU run by file (what matters most first, should the limit stop it); a
    file missing from that list would silently run last."""
    from conftest import GPU_FILE_ORDER

    tests = Path(__file__).resolve().parent
    with_gpu = {p.name for p in tests.glob("test_*.py")
                if re.search(r"^@pytest\.mark\.gpu$", p.read_text(), re.M)}
    assert with_gpu == set(GPU_FILE_ORDER)
    assert GPU_FILE_ORDER[:2] == ("test_cuda_mslora.py", "test_triton_mslora.py")
