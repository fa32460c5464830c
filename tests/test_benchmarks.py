"""The benchmark runner (benchmarks/), tested on the CPU at tiny sizes: its outputs, stamps,
failure rows and floor arithmetic. Its numbers on a CPU mean nothing; its shape is what is tested.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import floors, measure, presets, providers, readme, report
from benchmarks import run as bench_run
from mslora_kernels.models import ResNet

TINY_ARGS = ["--device", "cpu", "--tiny", "--providers", "eager,compile,triton,cuda",
             "--compile-backend", "aot_eager", "--layouts", "channels_first,channels_last",
             "--cpu-reps", "2"]
STAMPS = ("device", "torch", "triton", "cuda", "commit", "date")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CPU run of the runner; Triton unavailable (no interpreter), no CUDA extension."""
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the 'test' extra)")
    out = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    try:
        assert bench_run.main(TINY_ARGS + ["--out", str(out)]) == 0
    finally:
        mp.undo()
    return out


# ---- floors, by hand ---------------------------------------------------------------------------
def test_floors_by_hand():
    # N=1, C=4, H=W=2, D=4, G=2, K=(3,): P = 3*4*4/2 + 4*4 + 9*4 = 76 parameters, fp32.
    assert floors.param_count(4, 4, 2, (3,)) == 76
    args = (1, 4, 2, 2, 4, 2, (3,), 4)
    assert floors.min_bytes("fwd", *args) == (2 * 16 + 76) * 4  # read x, write out, weights
    assert floors.min_bytes("bwd", *args) == (3 * 16 + 2 * 76) * 4  # x, d, dx; weights + grads
    assert floors.min_bytes("fwd+bwd", *args) == (5 * 16 + 3 * 76) * 4
    assert floors.depthwise_fmas("fwd", 1, 2, 2, 4, (3,)) == 9 * 4 * 4
    assert floors.depthwise_fmas("fwd+bwd", 1, 2, 2, 4, (3,)) == 3 * 9 * 4 * 4
    f = floors.floors("fwd", *args, copy_bytes_per_s=1e9, fma_per_s=1e6)
    assert f["mem_floor_ms"] == pytest.approx(432 / 1e9 * 1e3)
    assert f["fma_floor_ms"] == pytest.approx(144 / 1e6 * 1e3)
    assert f["floor_ms"] == f["fma_floor_ms"] and f["floor_bound"] == "fma"
    g = floors.floors("fwd", *args, copy_bytes_per_s=1e3, fma_per_s=None)
    assert g["fma_floor_ms"] is None and g["floor_bound"] == "memory"


def test_floors_match_design_table():
    """DESIGN.md's table: 83 FMAs per element for K=(3,5,7); ResNet-50 s1 51.4 MB, 2.13 G FMAs;
    Swin-B s1 102.8 MB (bf16, N=64, D=128, G=4)."""
    k = presets.DEFAULT_KERNEL_SIZES
    assert sum(x * x for x in k) == 83
    def mb(n, c, h, w):
        return floors.min_bytes("fwd", n, c, h, w, 128, 4, k, 2) / 1e6

    assert mb(64, 64, 56, 56) == pytest.approx(51.4, abs=0.1)
    assert mb(64, 128, 56, 56) == pytest.approx(102.8, abs=0.1)
    assert mb(2, 64, 200, 336) == pytest.approx(34.4, abs=0.1)
    assert floors.depthwise_fmas("fwd", 64, 56, 56, 128, k) / 1e9 == pytest.approx(2.13, abs=0.01)


def _goal_row(**kw):
    row = {"kind": "kernel", "provider": "triton", "dtype": "bf16", "goal_preset": True,
           "D": 128, "G": 4, "K": "3,5,7", "N": 64, "mode": "fwd"}
    row.update(kw)
    return row


def test_goals_met_missed_and_unmeasured():
    ok = floors.evaluate_goals(_goal_row(speedup_vs_eager=6.0, frac_of_floor=0.8), None)
    assert [g["met"] for g in ok] == [True, True]
    slow = floors.evaluate_goals(_goal_row(speedup_vs_eager=4.9, frac_of_floor=0.5), None)
    assert [g["met"] for g in slow] == [False, False]
    assert all("MISSED" in g["text"] for g in slow)
    failed = floors.evaluate_goals(_goal_row(mode="fwd+bwd", status="failed"), 100.0)
    assert len(failed) == 3 and not any(g["met"] for g in failed)
    assert all("not measured" in g["text"] for g in failed)
    mem = floors.evaluate_goals(_goal_row(mode="fwd+bwd", speedup_vs_eager=5,
                                          speedup_vs_compile=2.5, peak_mem_mb=30.0), 100.0)
    assert [g["met"] for g in mem] == [True, True, False]  # 0.30 of eager's peak > 0.25
    assert floors.evaluate_goals(_goal_row(dtype="fp16", speedup_vs_eager=9), None) == []
    assert floors.evaluate_goals(_goal_row(provider="compile", speedup_vs_eager=9), None) == []
    assert floors.evaluate_goals(_goal_row(mode="bwd", speedup_vs_eager=9), None) == []


# ---- a tiny run's outputs ----------------------------------------------------------------------
def test_tiny_run_writes_the_five_files(tiny_run):
    assert sorted(p.name for p in tiny_run.iterdir()) == sorted(report.OUTPUT_FILES)
    for png in (report.SPEEDUP_PNG, report.ROOFLINE_PNG):
        data = (tiny_run / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_tiny_run_rows_columns_and_stamps(tiny_run):
    data = json.loads((tiny_run / report.JSON_NAME).read_text())
    meta, rows = data["run"], data["rows"]
    # 2 layouts x 3 modes x 4 providers, no end-to-end rows with --tiny
    assert len(rows) == 2 * 3 * 4
    for r in rows:
        assert list(r) == report.COLUMNS
        for k in STAMPS:
            assert r[k] and r[k] == meta[k], k
        assert r["device"].startswith("CPU")
        assert r["torch"] == torch.__version__
        assert r["copy_gb_per_s"] > 0
    with open(tiny_run / report.CSV_NAME, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.COLUMNS
        assert len(list(reader)) == len(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"eager", "compile"}
    for r in ok:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["images_per_s"] == pytest.approx(r["N"] / (r["median_ms"] * 1e-3))
        assert r["gb_per_s"] == pytest.approx(r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["min_bytes"] == floors.min_bytes(r["mode"], r["N"], r["C"], r["H"], r["W"],
                                                  r["D"], r["G"], (3, 5, 7), 4)
        assert r["frac_of_floor"] == pytest.approx(r["floor_ms"] / r["median_ms"])
        assert r["floor_ms"] == max(r["mem_floor_ms"], r["fma_floor_ms"])
        assert r["rel_err_vs_eager"] < 1e-4
    eager = [r for r in ok if r["provider"] == "eager"]
    assert all(r["speedup_vs_eager"] == 1.0 for r in eager)
    fb = [r for r in ok if r["mode"] == "fwd+bwd"]
    assert fb and all(r["peak_mem_mb"] is None and "CUDA" in r["peak_mem_note"] for r in fb)


def test_unavailable_providers_carry_text_and_no_number(tiny_run):
    _, rows = report.load(tiny_run)
    bad = [r for r in rows if r["provider"] in ("triton", "cuda")]
    assert len(bad) == 12
    for r in bad:
        assert r["status"] == "unavailable"
        assert "Triton" in r["error"] or "CUDA" in r["error"]
        for k in report.NUMBER_COLUMNS:
            assert r[k] is None, k


def test_markdown_names_the_run_and_flags_cpu(tiny_run):
    md = (tiny_run / report.MD_NAME).read_text()
    meta, rows = report.load(tiny_run)
    assert report.run_name(meta) in md and meta["commit"] in md
    # the run's PEFT, the lora-peft rows' library (the test extra installs it)
    assert meta["peft"] != "not installed" and f"PEFT {meta['peft']}," in md
    assert "mean nothing for the GPU" in md
    assert "| preset | shape | layout |" in md
    assert f"]({report.SPEEDUP_PNG})" in md and f"]({report.ROOFLINE_PNG})" in md
    assert md.count("**unavailable**") == 12


def test_readme_renders_from_results(tiny_run, capsys):
    assert readme.main([str(tiny_run)]) == 0
    text = capsys.readouterr().out
    assert "do not edit by hand" in text
    assert f"/{report.SPEEDUP_PNG})" in text and "### Kernel rows" in text


def test_failing_provider_records_failure_text(tmp_path, monkeypatch):
    real_build = providers.build

    def build(provider, base, compile_backend="inductor"):
        if provider == "compile":
            raise RuntimeError("boom: compiler exploded")
        return real_build(provider, base, compile_backend)

    monkeypatch.setattr(providers, "build", build)
    assert bench_run.main(["--device", "cpu", "--tiny", "--providers", "eager,compile",
                           "--layouts", "channels_first", "--modes", "fwd,fwd+bwd",
                           "--cpu-reps", "1", "--out", str(tmp_path)]) == 0
    _, rows = report.load(tmp_path)
    comp = [r for r in rows if r["provider"] == "compile"]
    assert len(comp) == 2
    for r in comp:
        assert r["status"] == "failed" and "boom: compiler exploded" in r["error"]
        assert all(r[k] is None for k in report.NUMBER_COLUMNS)
    assert all(r["speedup_vs_compile"] is None for r in rows)
    assert all(r["median_ms"] > 0 for r in rows if r["provider"] == "eager")


def test_triton_compile_provider_is_refused_on_a_cpu_and_built_from_the_base(monkeypatch):
    """torch.compile of the Triton module: on a CPU it says why it cannot run (Triton's own
    reason, or, under the interpreter, that torch.compile cannot trace it); built, it is the
    compiled fused module with the base's weights, dtype and options."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert providers.unavailable("triton-compile", cpu) == providers.unavailable("triton", cpu)
    assert "TRITON_INTERPRET" in providers.unavailable("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert providers.unavailable("triton", cpu) is None
    assert "needs a CUDA device" in providers.unavailable("triton-compile", cpu)
    assert providers.unavailable("eager", cpu) is None

    base = providers.make_base(8, 4, 2, (3, 5), "channels_last", torch.float64, cpu)
    fn, detail = providers.build("triton-compile", base, "aot_eager")
    assert isinstance(fn, torch._dynamo.eval_frame.OptimizedModule)
    m = fn._orig_mod
    assert m.backend == "triton" and m.options == base.options
    assert detail == ('torch.compile(MSLoRA(backend="triton"), backend=\'aot_eager\', '
                      "dynamic=False)")
    got, want = m.state_dict(), base.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == torch.float64 and torch.equal(got[k], want[k]), k
    assert "triton-compile" in providers.COMPILED and "triton" not in providers.COMPILED


def test_every_compiled_provider_times_bwd_with_a_compile_of_its_own(tmp_path, monkeypatch):
    """bwd replays backward(retain_graph=True), which a compiled provider needs compiled without
    donated buffers: triton-compile gets that path like compile does. Stood in for here by the
    compiled reference (Inductor over the Triton kernels needs a GPU)."""
    real_build, real_unavailable = providers.build, providers.unavailable

    def build(provider, base, compile_backend="inductor"):
        if provider == "triton-compile":
            return real_build("compile", base, compile_backend)
        return real_build(provider, base, compile_backend)

    monkeypatch.setattr(providers, "build", build)
    monkeypatch.setattr(providers, "unavailable",
                        lambda p, d: None if p == "triton-compile" else real_unavailable(p, d))
    assert bench_run.main(["--device", "cpu", "--tiny", "--providers", "eager,triton-compile",
                           "--compile-backend", "aot_eager", "--layouts", "channels_first",
                           "--modes", "fwd,bwd", "--cpu-reps", "1", "--out", str(tmp_path)]) == 0
    _, rows = report.load(tmp_path)
    got = {(r["provider"], r["mode"]): r for r in rows}
    assert set(got) == {(p, m) for p in ("eager", "triton-compile") for m in ("fwd", "bwd")}
    for r in got.values():
        assert r["status"] == "ok" and r["median_ms"] > 0, (r["provider"], r["mode"], r["error"])
    assert bench_run.DONATED_NOTE in got["triton-compile", "bwd"]["provider_detail"]
    assert bench_run.DONATED_NOTE not in got["triton-compile", "fwd"]["provider_detail"]


SMALL_ARGS = ["--device", "cpu", "--tiny", "--providers", "eager", "--modes", "fwd,fwd+bwd",
              "--cpu-reps", "1"]  # three groups: one per layout


def test_a_mode_failing_after_its_timing_keeps_no_number(tmp_path, monkeypatch):
    """The peak-memory measurement (after the timing) fails: the row is a failure with no time,
    no floor fraction, no speed-up, and the markdown shows the failure, not the time."""
    def peak(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(measure, "peak_memory_mb", peak)
    assert bench_run.main(SMALL_ARGS + ["--out", str(tmp_path)]) == 0
    _, rows = report.load(tmp_path)
    failed = [r for r in rows if r["mode"] == "fwd+bwd"]
    assert failed and all(r["status"] == "failed" and "simulated" in r["error"] for r in failed)
    assert all(r[k] is None for r in failed for k in report.NUMBER_COLUMNS)
    assert all(r["median_ms"] > 0 for r in rows if r["mode"] == "fwd")
    md = (tmp_path / report.MD_NAME).read_text()
    assert md.count("**failed**: fwd+bwd: RuntimeError: CUDA out of memory") == len(failed)


def test_a_group_whose_set_up_fails_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """The second group's module cannot be built (as after a kernel's CUDA error): its rows are
    failures, the other groups are measured, and every output is written."""
    real, calls = providers.make_base, []

    def make_base(*a, **k):
        calls.append(a)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(providers, "make_base", make_base)
    assert bench_run.main(SMALL_ARGS + ["--out", str(tmp_path)]) == 0
    assert len(calls) >= 3
    meta, rows = report.load(tmp_path)
    assert meta["ended"] == "complete"
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["layout"], []).append(r)
    bad = [g for g in groups.values() if any(r["status"] == "failed" for r in g)]
    assert len(bad) == 1 and all(r["status"] == "failed" and "group set-up" in r["error"]
                                 and r["median_ms"] is None for r in bad[0])
    assert sum(r["status"] == "ok" for r in rows) == len(rows) - len(bad[0])
    assert all((tmp_path / f).exists() for f in report.OUTPUT_FILES)


def test_sigterm_writes_what_was_measured(tmp_path, monkeypatch):
    """A time limit's SIGTERM during the second group: the first group's rows, the tables and
    the plots are written, and the run says it was cut off."""
    import os
    import signal

    real, calls = bench_run.measure_group, []

    def measure_group(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(bench_run, "measure_group", measure_group)
    with pytest.raises(SystemExit) as e:
        bench_run.main(SMALL_ARGS + ["--out", str(tmp_path)])
    assert e.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
    meta, rows = report.load(tmp_path)
    assert meta["ended"].startswith("cut off") and rows
    first, second = rows[:2], rows[2:]  # the group stopped before it measured anything
    assert [r["layout"] for r in rows] == ["channels_first"] * 2 + ["channels_first_cl"] * 2
    assert all(r["status"] == "ok" for r in first)
    assert all(r["status"] == "cut off" and r["median_ms"] is None for r in second)
    assert "was cut off" in (tmp_path / report.MD_NAME).read_text()
    assert all((tmp_path / f).exists() for f in report.OUTPUT_FILES)


def test_sigterm_in_a_group_keeps_its_finished_rows(tmp_path, monkeypatch):
    """SIGTERM while the first group's second provider compiles (the slow part of a group, where
    a time limit most likely falls): the first provider's rows are kept with their numbers, the
    rest of the group is "cut off" with none, and the tables and plots are written."""
    import os
    import signal

    real = providers.build

    def build(prov, *a, **k):
        if prov == "compile":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(prov, *a, **k)

    monkeypatch.setattr(providers, "build", build)
    args = ["--device", "cpu", "--tiny", "--providers", "eager,compile", "--modes", "fwd,fwd+bwd",
            "--cpu-reps", "1", "--compile-backend", "aot_eager", "--layouts", "channels_first"]
    with pytest.raises(SystemExit):
        bench_run.main(args + ["--out", str(tmp_path)])
    meta, rows = report.load(tmp_path)
    assert meta["ended"].startswith("cut off")
    got = {(r["provider"], r["mode"]): r for r in rows}
    assert set(got) == {(p, m) for p in ("eager", "compile") for m in ("fwd", "fwd+bwd")}
    assert all(got["eager", m]["status"] == "ok" and got["eager", m]["median_ms"] > 0
               for m in ("fwd", "fwd+bwd"))
    for m in ("fwd", "fwd+bwd"):
        r = got["compile", m]
        assert r["status"] == "cut off" and r["error"] == bench_run.CUT_OFF
        assert all(r[k] is None for k in report.NUMBER_COLUMNS)
    md = (tmp_path / report.MD_NAME).read_text()
    assert md.count("**cut off**") == 2
    assert all((tmp_path / f).exists() for f in report.OUTPUT_FILES)


def test_a_provider_with_a_wrong_output_records_a_failure_not_a_time(tmp_path, monkeypatch):
    """A provider whose branch H(x) is off (here by 1% of x, a sixth of the branch) gets no
    number: a fast kernel that computes the wrong thing must not show as a speed-up."""
    real = providers.build

    class Off(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 0.01 * x

    def build(prov, *a, **k):
        fn, detail = real(prov, *a, **k)
        return (Off(fn) if prov == "compile" else fn), detail

    monkeypatch.setattr(providers, "build", build)
    args = ["--device", "cpu", "--tiny", "--providers", "eager,compile", "--modes", "fwd",
            "--cpu-reps", "1", "--compile-backend", "aot_eager", "--layouts", "channels_first"]
    assert bench_run.main(args + ["--out", str(tmp_path)]) == 0
    _, rows = report.load(tmp_path)
    eager, compiled = rows
    assert eager["status"] == "ok" and eager["rel_err_vs_eager"] == 0
    assert compiled["status"] == "failed" and "wrong output" in compiled["error"]
    assert all(compiled[k] is None for k in report.NUMBER_COLUMNS)


def test_report_re_renders_from_results_json(tmp_path):
    assert bench_run.main(SMALL_ARGS + ["--out", str(tmp_path)]) == 0
    md = (tmp_path / report.MD_NAME).read_text()
    for f in (report.MD_NAME, report.SPEEDUP_PNG, report.ROOFLINE_PNG):
        (tmp_path / f).unlink()
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / report.MD_NAME).read_text() == md
    assert (tmp_path / report.SPEEDUP_PNG).exists() and (tmp_path / report.ROOFLINE_PNG).exists()
    assert report.main([str(tmp_path / "nothing")]) == 2


def test_time_budget_skips_with_a_reason(tmp_path):
    assert bench_run.main(["--device", "cpu", "--tiny", "--providers", "eager", "--time-budget",
                           "0", "--out", str(tmp_path)]) == 0
    _, rows = report.load(tmp_path)
    assert rows and all(r["status"] == "skipped" and "time budget" in r["error"] for r in rows)
    assert all(r["median_ms"] is None for r in rows)


def test_markdown_shows_missed_goals():
    meta = {"date": "2026-01-01T00:00:00Z", "device": "NVIDIA H100", "commit": "abc",
            "torch": "t", "triton": "tr", "cuda": "c", "copy_bytes_per_s": 3e12,
            "copy_method": "m", "fma_per_s": 3e13, "fma_method": "f"}
    row = {k: None for k in report.COLUMNS}
    row.update(_goal_row(speedup_vs_eager=2.0, frac_of_floor=0.2, shape="64@56x56",
                         preset="resnet50", layout="channels_first", status="ok", median_ms=1.0,
                         p20_ms=0.9, p80_ms=1.1))
    goals = floors.evaluate_goals(row, None)
    row["goals"] = "; ".join(g["text"] for g in goals)
    md = report.render_markdown(meta, [row])
    assert "**0 met, 2 missed**" in md and "MISSED" in md
    assert "mean nothing" not in md


def test_quick_plan():
    p = bench_run.plan(bench_run.parse_args(["--quick", "--device", "cpu"]))
    got = [(s.preset, s.stage, s.n, lay, dt) for s, lay, dt, _ in p["groups"]]
    assert got == [("resnet50", 1, 64, "channels_first", "bf16"),
                   ("resnet50", 1, 64, "channels_first_cl", "bf16"),
                   ("swin_b", 3, 64, "channels_last", "bf16"),
                   ("detection", 1, 2, "channels_first", "bf16")]
    assert p["modes"] == ["fwd", "fwd+bwd"]
    assert p["providers"] == ["eager", "triton", "cuda", "compile"]  # compile's cold start last
    assert p["e2e_models"] == ["resnet50", "swin_b"] and p["budget"] == bench_run.QUICK_BUDGET_S
    full = bench_run.plan(bench_run.parse_args(["--device", "cpu", "--max-autotune"]))
    assert len(full["groups"]) == 9 * 3 * 3 and "compile-max" in full["providers"]


def test_bad_selection_is_refused():
    with pytest.raises(SystemExit, match="unknown dtypes"):
        bench_run.plan(bench_run.parse_args(["--device", "cpu", "--dtypes", "fp8"]))


def test_git_commit_env_override(monkeypatch):
    monkeypatch.setenv("MSLORA_COMMIT", "deadbeef")
    assert measure.git_commit() == "deadbeef"


def test_input_layouts():
    x = providers.make_input(2, 8, 5, 3, "channels_first_cl", torch.float32, "cpu", seed=0)
    assert x.shape == (2, 8, 5, 3) and x.is_contiguous(memory_format=torch.channels_last)
    y = providers.make_input(2, 8, 5, 3, "channels_last", torch.float32, "cpu", seed=0)
    assert y.shape == (2, 5, 3, 8) and y.is_contiguous()
    base = providers.make_base(8, 4, 2, (3,), "channels_first", torch.float32, "cpu")
    assert base.up.weight.abs().min() > 0  # a live branch, not a fresh adapter's zeros


@pytest.mark.interpreter
def test_fma_kernel_computes_its_chains():
    x = torch.rand(300)
    out = measure.run_fma_kernel(x, 0.999, 0.001, 4)
    torch.testing.assert_close(out, measure.fma_reference(x, 0.999, 0.001, 4))


FMA_PTX = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks import fma_kernel
case, = fma_kernel.compile_cases()
def ptx(opts):
    src = ASTSource(case.fn, case.signature, case.constexprs, case.attrs())
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
pinned, off = ptx(case.options()), ptx({**case.options(), "enable_fp_fusion": False})
print(json.dumps({k: [t.count(op) for op in ("fma.rn.f32", "mul.rn.f32", "add.rn.f32")]
                  for k, t in (("pinned", pinned), ("off", off))}))
"""


def test_fma_kernel_compiles_to_fmas():
    """The FMA-rate kernel (the FMA floor's denominator) compiles to one FMA per chain step for
    sm_90, with FP fusion as it launches (pinned): without fusion the same source gives a
    multiply and an add per step, and the rate it measures (steps per second) would be about
    half the FMA rate."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", FMA_PTX], capture_output=True, text=True, env=env,
                       timeout=300, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout.splitlines()[-1])
    chains = measure.FMA_CHAINS  # one step of each chain per pass of the (rolled) loop
    fma, mul, _ = counts["pinned"]
    assert fma >= chains and mul == 0, counts
    # without fusion: rounded (.rn) multiplies and adds, which ptxas may not contract either
    fma_off, mul_off, add_off = counts["off"]
    assert fma_off == 0 and mul_off >= chains and add_off >= chains, counts


@pytest.mark.gpu
def test_gpu_rates_and_a_small_run(tmp_path):
    dev = torch.device("cuda")
    rates = measure.copy_bandwidth(dev, 64 << 20)
    rates.update(measure.fma_rate(dev))
    assert rates["copy_bytes_per_s"] > 1e11 and rates["fma_per_s"] and rates["fma_per_s"] > 1e12
    assert bench_run.main(["--device", "cuda", "--presets", "resnet50", "--stages", "4",
                           "--batch", "4", "--dtypes", "bf16", "--layouts", "channels_first",
                           "--e2e", "none", "--out", str(tmp_path)]) == 0
    _, rows = report.load(tmp_path)
    # every provider that can run here ran every mode (the runner records a failure and goes
    # on, so its exit status alone would not say), with an output that matches eager's
    ran = [r for r in rows if providers.unavailable(r["provider"], dev) is None]
    assert {r["provider"] for r in ran} >= {"eager", "compile", "triton"}
    for r in ran:
        assert r["status"] == "ok", (r["provider"], r["mode"], r["error"])
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert r["rel_err_vs_eager"] <= bench_run.BRANCH_TOLERANCE["bf16"]
        if r["mode"] == "fwd+bwd":
            assert r["peak_mem_mb"] > 0, r["provider"]


class _TinyResNet(ResNet):
    """The package's small torchvision-style ResNet, with timm's get_classifier()."""

    def get_classifier(self):
        return self.fc


def test_e2e_train_step_and_unavailable_variants(monkeypatch):
    """The end-to-end code on a stand-in for timm (timm is on the GPU machine only)."""
    import types

    from benchmarks import e2e

    fake = types.ModuleType("timm")
    fake.create_model = lambda name, pretrained, num_classes: _TinyResNet(num_classes=num_classes)
    monkeypatch.setitem(sys.modules, "timm", fake)
    monkeypatch.setitem(e2e.PEFT_TARGETS, "swin_b", r".*conv2")  # the stand-in's 3x3 convs
    cpu = torch.device("cpu")
    model, detail = e2e.build_model("resnet50", "full-ft", cpu)
    res = e2e.time_train_step(model, 2, cpu, image_size=8, num_classes=5, warmup=1, steps=2)
    assert 0 < res["p20_ms"] <= res["median_ms"] <= res["p80_ms"]
    assert res["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert res["peak_mem_mb"] is None
    for variant in ("mslora-eager", "lora-peft", "mslora-cuda"):
        try:
            model, _ = e2e.build_model("swin_b", variant, cpu)
        except e2e.Unavailable as e:
            assert str(e)  # says why
        else:  # inject or PEFT is importable here: the head and the adapters train, not the rest
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            assert trainable and len(trainable) < len(list(model.parameters()))
            model.train()  # frozen BatchNorm stays in eval mode, for every adapter variant
            bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert bns and not any(m.training for m in bns), variant


def test_e2e_rows_skip_without_cuda(tmp_path):
    assert bench_run.main(["--device", "cpu", "--tiny", "--providers", "eager", "--modes", "fwd",
                           "--layouts", "channels_first", "--cpu-reps", "1", "--e2e",
                           "resnet50", "--e2e-variants", "full-ft,lora-peft",
                           "--out", str(tmp_path)]) == 0
    _, rows = report.load(tmp_path)
    e2e_rows = [r for r in rows if r["kind"] == "e2e"]
    assert [r["provider"] for r in e2e_rows] == ["full-ft", "lora-peft"]
    assert all(r["status"] == "skipped" and "CUDA" in r["error"] for r in e2e_rows)
    assert "End-to-end" in (tmp_path / report.MD_NAME).read_text()


def test_plots_of_a_full_sized_run(tmp_path):
    """A full run's worth of groups (9 shapes x 3 layouts x 2 dtypes) plots without trouble."""
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the 'test' extra)")
    rows = []
    for i in range(27):
        for dt in ("bf16", "fp32"):
            for prov, med in (("eager", 2.0), ("compile", 1.0), ("triton", 0.25), ("cuda", None)):
                row = {k: None for k in report.COLUMNS}
                row.update(kind="kernel", preset="p", shape=f"{i}@7x7", N=64, layout="cl",
                           dtype=dt, mode="fwd", provider=prov, median_ms=med,
                           speedup_vs_eager=2.0 / med if med else None,
                           frac_of_floor=0.1 / med if med else None,
                           status="ok" if med else "failed", error="" if med else "boom")
                rows.append(row)
    report.plot_speedup(rows, tmp_path / "s.png")
    report.plot_roofline(rows, tmp_path / "r.png")
    for name in ("s.png", "r.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    kept, note = report._plot_rows(rows)
    assert {r["dtype"] for r in kept} == {"bf16"} and "bf16" in note
    plt = report._plt()
    fig, ax = plt.subplots()
    handles = report._bars(ax, kept, ["compile", "triton", "cuda"], "speedup_vs_eager")
    assert [h.get_label() for h in handles] == ["compile", "triton", "cuda (n/a in 27)"]
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "p 64x0@7x7\ncl bf16"
    plt.close(fig)


# ---- the kernel profile ---------------------------------------------------------------------
def test_profile_on_cpu_tables_the_reference_ops_stamped(tmp_path, capsys):
    """On a CPU the profile runs the eager reference at the tiny size: one table of operators,
    each with its calls and time per step, most expensive first, shares summing to the step,
    stamped and flagged as CPU time; printed and, with --out, written to profile.md."""
    from benchmarks import kernel_profile as profile

    assert profile.main(["--device", "cpu", "--steps", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "profile.md").read_text()
    assert text.strip() in capsys.readouterr().out
    assert "tiny s1 N=2 40@13x9, D=24" in text and "commit " in text and "torch " in text
    assert "says nothing about a GPU" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert len(rows) >= 5 and any("convolution" in r for r in rows)
    us = [float(r.split("|")[3]) for r in rows]
    assert us == sorted(us, reverse=True) and us[0] > 0
    shares = [float(ln.split("|")[4].strip().rstrip("%")) for ln in text.splitlines()
              if ln.startswith("| `") or " others |" in ln]
    assert abs(sum(shares) - 100) < 1


def test_profile_records_a_failing_provider(monkeypatch, capsys):
    """A provider that raises is recorded as FAILED with its error, never a table, and the
    exit status says so."""
    from benchmarks import kernel_profile as profile

    def boom(name, base):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(profile.providers, "build", boom)
    assert profile.main(["--device", "cpu", "--steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "eager: FAILED (RuntimeError: kernel exploded)" in out and "| `" not in out


def test_profile_refuses_zero_steps():
    from benchmarks import kernel_profile as profile

    with pytest.raises(SystemExit):
        profile.parse_args(["--steps", "0"])
