"""``python -m mslora_kernels`` (mslora_kernels/__main__.py): the check table of every backend
usable here against the float64 reference, its verdicts and its exit status."""

from __future__ import annotations

import pytest
import torch

from mslora_kernels import __main__ as check

TINY = ["--shape", "1", "8", "5", "3", "8", "2"]  # N, C, H, W, D, G


def _rows(out: str) -> list[list[str]]:
    """The table's case rows (not the 'not run' lines), split on spaces."""
    return [line.split() for line in out.splitlines()
            if line.startswith(("cpu ", "cuda ")) and "not run:" not in line]


def test_reference_rows_pass_and_exit_zero(capsys, monkeypatch):
    monkeypatch.setattr(check, "fused_unavailable_reason", lambda backend, dev: "not here")
    assert check.main(TINY) == 0
    out = capsys.readouterr().out
    rows = [r for r in _rows(out) if r[1] == "reference"]
    # fp32 x 3 layouts x {plain, all} on the CPU
    assert {(r[2], r[3], r[4]) for r in rows if r[0] == "cpu"} == {
        ("float32", lay, opt) for lay in check.LAYOUTS for opt in check.OPTIONS}
    assert all(r[-2] == "pass" for r in rows)
    assert "cpu    triton    not run: not here" in out
    assert out.rstrip().endswith("0 fail")


def test_a_wrong_result_fails_the_row_and_the_exit_status(capsys, monkeypatch):
    monkeypatch.setattr(check, "fused_unavailable_reason", lambda backend, dev: "not here")

    def wrong(name, actual, expected, dtype, baseline=None):
        if name == "grad x":
            raise AssertionError("grad x: off")

    monkeypatch.setattr(check, "check_close", wrong)
    assert check.main(TINY) == 1
    rows = _rows(capsys.readouterr().out)
    assert sum(r[0] == "cpu" for r in rows) == 6 and all(r[-2] == "FAIL" for r in rows)


def test_an_error_is_a_failed_row_naming_it(capsys, monkeypatch):
    monkeypatch.setattr(check, "fused_unavailable_reason", lambda backend, dev: "not here")

    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(check, "run_case", boom)
    assert check.main(TINY) == 1
    out = capsys.readouterr().out
    assert "ERROR RuntimeError: kernel exploded" in out


@pytest.mark.interpreter
def test_interpreted_triton_rows_in_every_dtype(capsys):
    rc = check.main(TINY)
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [r for r in _rows(out) if r[0] == "cpu" and r[1] == "triton"]
    assert {(r[2], r[3], r[4]) for r in rows} == {
        (dt, lay, opt) for dt in ("float32", "bfloat16", "float16") for lay in check.LAYOUTS
        for opt in check.OPTIONS}
    assert all(r[-2] == "pass" for r in rows)
    if not torch.cuda.is_available():
        assert "cpu    cuda      not run:" in out
