"""The workspace budget rule (mslora_kernels.workspace): the env var and the image slices."""

from __future__ import annotations

import pytest
import torch

from mslora_kernels import workspace
from mslora_kernels.workspace import DEFAULT_MB, ENV_VAR, image_slices, workspace_budget


def _sizes(slices):
    return [b - a for a, b in slices]


def _check_cover(n, slices):
    assert slices[0][0] == 0 and slices[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    assert all(b > a for a, b in slices)


@pytest.mark.parametrize("n,per,want", [
    (64, 16, [16, 16, 16, 16]),
    (10, 4, [4, 3, 3]),  # balanced, not 4, 4, 2
    (5, 2, [2, 2, 1]),
    (3, 2, [2, 1]),
    (7, 7, [7]),
    (7, 6, [4, 3]),
    (1, 1, [1]),
])
def test_slices_are_few_balanced_and_cover(n, per, want):
    bpi = 1000
    # a budget with room for `per` images and a bit (never a whole extra image)
    slices = image_slices(n, bpi, budget=per * bpi + bpi // 2)
    _check_cover(n, slices)
    assert _sizes(slices) == want


def test_budget_smaller_than_one_image_gives_one_image_a_slice():
    assert _sizes(image_slices(3, 10_000, budget=1)) == [1, 1, 1]
    assert image_slices(1, 10_000, budget=1) == [(0, 1)]


def test_budget_larger_than_everything_gives_one_slice():
    assert image_slices(64, 1000, budget=1 << 40) == [(0, 64)]
    assert image_slices(5, 0, budget=1) == [(0, 5)]  # no workspace at all


def test_every_slice_fits_when_an_image_fits():
    for n in range(1, 40):
        for per in range(1, n + 2):
            slices = image_slices(n, 3, budget=3 * per)
            _check_cover(n, slices)
            sizes = _sizes(slices)
            assert max(sizes) <= per and max(sizes) - min(sizes) <= 1
            assert len(slices) == -(-n // per)


def test_no_slice_exceeds_the_grid_limit():
    """Images go on grid axis 1 (at most 65535 blocks): a batch of tiny maps whose workspaces
    all fit the budget is still cut, into balanced slices of at most 65535 images."""
    cap = workspace.MAX_IMAGES_PER_SLICE
    assert cap == 65535
    assert image_slices(cap, 0) == [(0, cap)]
    assert image_slices(cap, 16, budget=1 << 40) == [(0, cap)]
    for n, bpi in ((cap + 1, 0), (2 * cap + 1, 16), (200_000, 64)):
        slices = image_slices(n, bpi, budget=1 << 40)
        _check_cover(n, slices)
        sizes = _sizes(slices)
        assert max(sizes) <= cap and max(sizes) - min(sizes) <= 1
        assert len(slices) == -(-n // cap)
    # a byte budget tighter than the cap still decides
    sizes = _sizes(image_slices(2 * cap + 1, 1000, budget=7 * 1000))
    assert max(sizes) == 7 and min(sizes) >= 6 and len(sizes) == -(-(2 * cap + 1) // 7)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one image"):
        image_slices(0, 10, budget=100)
    with pytest.raises(ValueError, match="bytes_per_image"):
        image_slices(2, -1, budget=100)
    with pytest.raises(ValueError, match="budget"):
        image_slices(2, 10, budget=0)


def test_env_var_sets_the_budget(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert workspace_budget() == DEFAULT_MB << 20 == 64 << 20
    monkeypatch.setenv(ENV_VAR, "3")
    assert workspace_budget() == 3 << 20
    assert image_slices(4, 1 << 20) == [(0, 2), (2, 4)]  # room for 3: two slices of 2
    monkeypatch.setenv(ENV_VAR, " 128 ")
    assert workspace_budget() == 128 << 20
    monkeypatch.setenv(ENV_VAR, "")
    assert workspace_budget() == DEFAULT_MB << 20


@pytest.mark.parametrize("bad", ["0", "-5", "1.5", "lots", "64MB"])
def test_env_var_refuses_non_positive_or_non_integer(monkeypatch, bad):
    monkeypatch.setenv(ENV_VAR, bad)
    with pytest.raises(ValueError, match=ENV_VAR):
        workspace_budget()
    with pytest.raises(ValueError, match=ENV_VAR):
        image_slices(4, 10)


def test_rows_is_the_tensor_itself_for_the_whole_batch():
    t = torch.arange(12.0).view(4, 3)
    assert workspace.rows(t, 0, 4) is t
    part = workspace.rows(t, 1, 3)
    assert part.data_ptr() == t[1].data_ptr() and part.shape == (2, 3)
    torch.testing.assert_close(part, t[1:3])
