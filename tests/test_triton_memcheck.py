"""The interpreter's memcheck (tests/triton_memcheck.py), which conftest turns on for every
interpreted Triton test: it must catch each kind of access outside the tensors a kernel was
given, and pass every access inside them."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton_memcheck import TritonMemcheckError, triton_memcheck  # noqa: E402

pytestmark = pytest.mark.interpreter


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr):
    i = tl.arange(0, BLOCK)
    v = tl.load(src + i, mask=i < n, other=0.0) if MASK_LOAD else tl.load(src + i)
    if MASK_STORE:
        tl.store(dst + i, v, mask=i < n)
    else:
        tl.store(dst + i, v)


@triton.jit
def _accumulate(dst, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    i = tl.arange(0, BLOCK)
    if MASKED:
        tl.atomic_add(dst + i, 1.0, mask=i < n)
    else:
        tl.atomic_add(dst + i, 1.0)


def _run_copy(src, dst, mask_load, mask_store):
    _copy[(1,)](src, dst, src.numel(), BLOCK=16, MASK_LOAD=mask_load, MASK_STORE=mask_store)


def test_masked_accesses_inside_the_tensors_pass():
    src, dst = torch.randn(13), torch.zeros(13)
    with triton_memcheck():
        _run_copy(src, dst, True, True)
        _accumulate[(1,)](dst, 13, BLOCK=16, MASKED=True)
    assert torch.equal(dst, src + 1)


@pytest.mark.parametrize("mask_load, mask_store, op", [(False, True, "load"),
                                                       (True, False, "store")])
def test_a_lane_past_the_end_is_caught(mask_load, mask_store, op):
    src, dst = torch.randn(13), torch.zeros(13)
    with triton_memcheck(), pytest.raises(Exception, match=rf"kernel _copy: {op} of 3 lane"):
        _run_copy(src, dst, mask_load, mask_store)


def test_an_atomic_past_the_end_is_caught():
    with triton_memcheck(), pytest.raises(Exception, match=r"kernel _accumulate: atomic of 3"):
        _accumulate[(1,)](torch.zeros(13), 13, BLOCK=16, MASKED=False)


def test_a_view_counts_as_itself_not_its_storage():
    """A slice of a larger buffer (a workspace slice, one slice of a batch): reading past its
    end reads the next slice, which the allocation-level check on a GPU would not see."""
    buf = torch.randn(2, 13)
    with triton_memcheck(), pytest.raises(Exception, match=r"load of 3 lane"):
        _run_copy(buf[0], torch.zeros(16), False, True)


def test_the_error_type_is_the_memchecks():
    # the interpreter wraps a launch's error; the message keeps the memcheck's text
    src, dst = torch.randn(13), torch.zeros(13)
    with triton_memcheck(), pytest.raises(Exception) as info:
        _run_copy(src, dst, False, True)
    assert "Triton memcheck" in str(info.value)
    assert isinstance(info.value.__cause__, TritonMemcheckError)
