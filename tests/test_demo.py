"""The demo runs end to end in its --quick setting and reports what it trained."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from mslora_kernels import mslora_param_count  # noqa: E402
from mslora_kernels.demo import main  # noqa: E402


def test_demo_quick(tmp_path, capsys):
    results = main(["--quick", "--no-progress", "--out", str(tmp_path), "--seed", "3"])
    out = capsys.readouterr().out
    by_name = {r.method: r for r in results}
    assert list(by_name) == ["linear probe", "MSLoRA", "full fine-tune"]
    head = 256 * 5 + 5  # the new task head: 256 features -> 5 classes
    assert by_name["linear probe"].trainable == head
    # one adapter per bottleneck, on the inner widths 16, 32, 64 (rank 16, G=4)
    assert by_name["MSLoRA"].trainable == head + sum(
        mslora_param_count(c, rank=16, groups=4) for c in (16, 32, 64))
    assert by_name["full fine-tune"].trainable > by_name["MSLoRA"].trainable
    for r in results:
        assert len(r.losses) == 2 and all(l > 0 for l in r.losses)
        assert 0.0 <= r.accuracy <= 1.0 and r.seconds > 0 and r.peak_mb > 0
        assert r.method in out
    assert "trainable params" in out and "peak train mem" in out
    for name in ("loss_curves.png", "mslora_reweighting.png"):
        png = tmp_path / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
