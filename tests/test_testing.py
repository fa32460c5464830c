"""The SPEC section 4 tolerance helper itself: it passes good results and fails bad ones."""

from __future__ import annotations

import pytest
import torch

from mslora_kernels.testing import check_close, no_tf32, rel_error, tolerance


def test_rel_error_and_nan():
    e = torch.randn(100, dtype=torch.float64)
    assert rel_error(e, e) == 0
    assert rel_error(2 * e, e) == pytest.approx(1.0)
    bad = e.clone()
    bad[3] = float("nan")
    assert rel_error(bad, e) == float("inf")


def test_non_finite_results_fail_even_against_a_non_finite_baseline():
    ref = torch.randn(100, dtype=torch.float64)
    nan = torch.full((100,), float("nan"), dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="x: the result has NaN or inf values"):
        check_close("x", nan, ref, torch.bfloat16, baseline=ref.bfloat16())
    with pytest.raises(AssertionError, match="x: the result has NaN or inf values"):
        check_close("x", nan, ref, torch.bfloat16, baseline=nan)
    inf_base = ref.bfloat16()
    inf_base[0] = float("inf")
    with pytest.raises(AssertionError, match="reference's own torch.bfloat16 run has NaN or inf"):
        check_close("x", ref.bfloat16(), ref, torch.bfloat16, baseline=inf_base)


def test_fp32_rule():
    assert tolerance(torch.float32) == 1e-4
    assert tolerance(torch.float32, tf32=True) == 1e-3
    ref = torch.randn(1000, dtype=torch.float64)
    check_close("ok", ref.float(), ref, torch.float32)
    with pytest.raises(AssertionError, match="exceeds the torch.float32 tolerance"):
        check_close("off", ref.float() * (1 + 1e-3), ref, torch.float32)


def test_low_precision_rule_is_relative_to_the_reference_in_that_dtype():
    ref = torch.randn(4096, dtype=torch.float64)
    base = ref.bfloat16()  # what the reference achieves in bf16
    check_close("same as reference", ref.bfloat16(), ref, torch.bfloat16, baseline=base)
    worse = (ref * (1 + 0.05)).bfloat16()
    with pytest.raises(AssertionError, match="reference's own torch.bfloat16 error"):
        check_close("worse", worse, ref, torch.bfloat16, baseline=base)
    with pytest.raises(ValueError, match="needs the reference's own error"):
        tolerance(torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_few_element_results_get_a_floor_of_a_few_roundings(dtype):
    """Up to SMALL_NUMEL elements the reference's own error counts as at least SMALL_ULPS x eps:
    a one-number gradient whose reference happens to be exact in ``dtype`` does not demand the
    kernel land on the same rounding; a wrong term is still caught; larger results keep the
    plain 2x rule."""
    from mslora_kernels.testing import SMALL_NUMEL, SMALL_ULPS

    eps = torch.finfo(dtype).eps
    exact = torch.tensor([1.0], dtype=torch.float64)  # the reference rounds it exactly
    three_ulps_off = torch.tensor([1.0 + 3 * eps], dtype=dtype)
    check_close("scalar", three_ulps_off, exact, dtype, baseline=exact.to(dtype))
    with pytest.raises(AssertionError, match="exceeds"):
        check_close("wrong", torch.tensor([1.0 + 3 * SMALL_ULPS * eps], dtype=dtype), exact, dtype,
                    baseline=exact.to(dtype))
    assert tolerance(dtype, baseline_error=0.0, numel=1) == pytest.approx(
        2 * SMALL_ULPS * eps + 1e-5)
    assert tolerance(dtype, baseline_error=0.0, numel=SMALL_NUMEL + 1) == pytest.approx(1e-5)
    big = torch.ones(SMALL_NUMEL + 1, dtype=torch.float64)
    with pytest.raises(AssertionError, match="exceeds"):
        check_close("many", (big * (1 + 3 * eps)).to(dtype), big, dtype, baseline=big.to(dtype))


@pytest.mark.parametrize("before", [True, False])
def test_no_tf32_turns_both_off_and_restores_them(before):
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = mm.allow_tf32, cudnn.allow_tf32
    try:
        mm.allow_tf32 = cudnn.allow_tf32 = before
        with pytest.raises(RuntimeError, match="inside"), no_tf32():
            assert (mm.allow_tf32, cudnn.allow_tf32) == (False, False)
            raise RuntimeError("inside")
        assert (mm.allow_tf32, cudnn.allow_tf32) == (before, before)
    finally:
        mm.allow_tf32, cudnn.allow_tf32 = old
