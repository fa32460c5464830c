"""backend="auto" on CUDA: the benchmark ranking (benchmarks.rank -> auto_backend.json) picks
the fused backend per input; without a ranking, the fixed order."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import rank as rank_mod
from mslora_kernels import backends
from mslora_kernels.config import MSLoRAOptions


def _row(provider, ms, c=64, h=56, w=56, d=128, dtype="bf16", layout="channels_first",
         status="ok", mode="fwd+bwd", kind="kernel"):
    return {"kind": kind, "mode": mode, "status": status, "provider": provider,
            "median_ms": ms if status == "ok" else None, "dtype": dtype, "layout": layout,
            "C": c, "H": h, "W": w, "D": d}


RESULTS = {
    "run": {"device": "NVIDIA H100 80GB HBM3", "date": "2026-01-01", "commit": "abc"},
    "rows": [
        _row("triton", 1.0), _row("cuda", 0.5), _row("eager", 3.0),          # cuda wins, C=64
        _row("triton", 0.2, c=1024, h=7, w=7), _row("cuda", 0.4, c=1024, h=7, w=7),
        _row("cuda", 0.1, c=512, h=14, w=14, status="failed"),                 # failed: ignored
        _row("triton", 0.3, c=512, h=14, w=14),
        _row("cuda", 0.01, mode="fwd"), _row("cuda", 0.01, kind="e2e"),       # other modes/kinds
    ],
}


def test_rank_picks_the_faster_ok_fused_provider():
    r = rank_mod.rank(RESULTS, "2026-01-01_H100")
    assert r["source"] == "2026-01-01_H100" and r["device"] == RESULTS["run"]["device"]
    got = {(x["C"], x["H"]): x["winner"] for x in r["rows"]}
    assert got == {(64, 56): "cuda", (1024, 7): "triton", (512, 14): "triton"}
    (c64,) = [x for x in r["rows"] if x["C"] == 64]
    assert c64["times_ms"] == {"triton": 1.0, "cuda": 0.5}


def test_rank_cli_writes_the_file_and_refuses_empty_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(RESULTS))
    out = tmp_path / "auto_backend.json"
    assert rank_mod.main([str(run), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 3
    (run / "results.json").write_text(json.dumps({"run": {}, "rows": [_row("eager", 1.0)]}))
    assert rank_mod.main([str(run), "--out", str(tmp_path / "none.json")]) == 1
    assert not (tmp_path / "none.json").exists()


def test_ranked_backend_takes_the_nearest_shape_of_the_same_dtype_and_layout():
    rows = tuple(rank_mod.rank(RESULTS, "r")["rows"])
    bf16, cf = torch.bfloat16, "channels_first"
    assert backends.ranked_backend(bf16, cf, 64, 50 * 60, 128, rows) == "cuda"
    assert backends.ranked_backend(bf16, cf, 768, 7 * 7, 128, rows) == "triton"
    assert backends.ranked_backend(torch.float16, cf, 64, 56 * 56, 128, rows) is None
    assert backends.ranked_backend(bf16, "channels_last", 64, 56 * 56, 128, rows) is None


def test_layout_names_match_the_benchmarks():
    x = torch.randn(2, 8, 5, 6)
    assert backends.layout_name(x, "channels_first") == "channels_first"
    assert backends.layout_name(x.contiguous(memory_format=torch.channels_last),
                                "channels_first") == "channels_first_cl"
    assert backends.layout_name(x.permute(0, 2, 3, 1), "channels_last") == "channels_last"
    from benchmarks import presets, providers
    assert set(presets.LAYOUT_HELP) == set(presets.LAYOUTS) == set(backends.LAYOUTS)
    assert {providers.DTYPES[n]: n for n in providers.DTYPES} == backends.DTYPE_NAMES


@pytest.fixture
def both_fused_usable(monkeypatch):
    monkeypatch.setattr(backends, "fused_unavailable_reason", lambda b, d: None)


def test_auto_follows_the_ranking(monkeypatch, both_fused_usable):
    rows = tuple(rank_mod.rank(RESULTS, "r")["rows"])
    monkeypatch.setattr(backends, "_ranking", lambda: rows)
    cuda = torch.device("cuda")
    x = torch.randn(1, 64, 56, 56, dtype=torch.bfloat16)  # a CPU tensor stands in for the shape
    assert backends.resolve_backend("auto", cuda, x, MSLoRAOptions(x.shape[1], 128)) == "cuda"
    x = torch.randn(1, 1024, 7, 7, dtype=torch.bfloat16)
    assert backends.resolve_backend("auto", cuda, x, MSLoRAOptions(x.shape[1], 128)) == "triton"
    # a dtype the ranking does not cover, or no input: the fixed order
    x = torch.randn(1, 64, 56, 56, dtype=torch.float16)
    assert backends.resolve_backend("auto", cuda, x, MSLoRAOptions(x.shape[1], 128)) == \
        backends.AUTO_ORDER_CUDA[0]
    assert backends.resolve_backend("auto", cuda) == backends.AUTO_ORDER_CUDA[0]


def test_auto_skips_a_ranked_backend_that_cannot_run(monkeypatch):
    rows = tuple(rank_mod.rank(RESULTS, "r")["rows"])
    monkeypatch.setattr(backends, "_ranking", lambda: rows)
    monkeypatch.setattr(backends, "fused_unavailable_reason",
                        lambda b, d: "not built" if b == "cuda" else None)
    x = torch.randn(1, 64, 56, 56, dtype=torch.bfloat16)
    assert backends.resolve_backend("auto", torch.device("cuda"), x, MSLoRAOptions(64, 128)) \
        == "triton"


def test_no_ranking_file_means_the_fixed_order(tmp_path):
    assert backends._ranking(tmp_path / "absent.json") == ()


# Winners of one dtype, layout, C and D at three sizes: cuda at the two larger maps, triton at the
# smallest.
SIZED_ROWS = tuple({"dtype": "bf16", "layout": "channels_first", "C": 64, "H": s, "W": s,
                    "D": 128, "winner": win}
                   for s, win in ((56, "cuda"), (28, "cuda"), (14, "triton")))


def test_nearest_winner_leaves_out_the_sizes_it_is_not_given():
    cf = "channels_first"
    assert backends.nearest_winner(SIZED_ROWS, "bf16", cf, 64, 14 * 14, 128) == "triton"
    assert backends.nearest_winner(SIZED_ROWS, "bf16", cf, 64, 50 * 50, 128) == "cuda"
    # H*W unknown: every row is as near; most of them chose cuda
    assert backends.nearest_winner(SIZED_ROWS, "bf16", cf, 64, None, 128) == "cuda"
    # a tie among the nearest rows goes to AUTO_ORDER_CUDA's first
    tie = SIZED_ROWS[1:]
    assert backends.nearest_winner(tie, "bf16", cf, 64, None, 128) == backends.AUTO_ORDER_CUDA[0]
    assert backends.nearest_winner(SIZED_ROWS, "fp16", cf, 64, None, 128) is None


@pytest.fixture
def sized_ranking_file(monkeypatch, tmp_path):
    """SIZED_ROWS as the ranking file, read by the package's own loader."""
    ranking = tmp_path / "auto_backend.json"
    ranking.write_text(json.dumps({"rows": SIZED_ROWS}))
    monkeypatch.setattr(backends, "RANKING_PATH", ranking)
    backends._ranking.cache_clear()
    yield
    backends._ranking.cache_clear()


@pytest.mark.parametrize("dynamic", [False, True])
def test_auto_under_torch_compile_ranks_without_the_map_size(sized_ranking_file, dynamic):
    """torch.compile(fullgraph=True) traces "auto"'s choice without a graph break (the ranking
    and the backends' availability, imports included, are evaluated when tracing, not traced)
    and ranks on C and D alone: the winner of most rows of that C and D (cuda, also for the
    14x14 map that triton won), the same for static and dynamic sizes, and with dynamic sizes
    one graph serves every map. Eager calls rank on H*W too."""
    cuda, o = torch.device("cuda"), MSLoRAOptions(64, 128)
    for b in ("triton", "cuda"):  # the real checks (a CPU tensor stands in for a CUDA one)
        if backends.fused_unavailable_reason(b, cuda) is not None:
            pytest.skip(backends.fused_unavailable_reason(b, cuda))
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm

    def f(x):
        return x + (1.0 if backends.resolve_backend("auto", cuda, x, o) == "cuda" else 2.0)

    compiled = torch.compile(f, backend=count, fullgraph=True, dynamic=dynamic)
    for s, eager_winner in ((14, "triton"), (28, "cuda"), (56, "cuda"), (15, "triton")):
        x = torch.zeros(2, 64, s, s + 1, dtype=torch.bfloat16)
        assert backends.resolve_backend("auto", cuda, x, o) == eager_winner
        assert compiled(x)[0, 0, 0, 0].item() == 1.0, (s, dynamic)
    assert len(graphs) == (1 if dynamic else 4)
