"""The fixes to Triton's CPU interpreter (mslora_kernels/triton/_interpreter.py): with them, bf16
in the interpreter computes what it computes on a GPU, checked here against PyTorch's own bf16
on the CPU (which, like the GPU, rounds each operation's fp32 result to nearest even)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mslora_kernels.triton._interpreter import (  # noqa: E402
    bf16_bits_to_fp32,
    fix_interpreter,
    fp32_to_bf16_bits,
)

fix_interpreter()

bf16 = torch.bfloat16


def _specials() -> torch.Tensor:
    """fp32 values at every rounding case of fp32 -> bf16: ties to even both ways, just above
    and below a tie, overflow to inf, subnormals, signed zero, inf, NaN."""
    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0xBF818000,
            0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x00000001, 0x00018000, 0x80008000,
            0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001]
    return torch.tensor(np.array(bits, dtype=np.uint32).view(np.float32))


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    g, w = got.view(torch.int16), want.view(torch.int16)
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(got.float()), nan)
    assert torch.equal(g[~nan], w[~nan]), (got[~nan], want[~nan])


def test_rounding_helpers_match_torch():
    x = torch.cat([_specials(), torch.randn(4096) * 10.0 ** torch.randint(-40, 38, (4096,))])
    want = x.to(bf16)
    got = torch.from_numpy(fp32_to_bf16_bits(x.numpy()).view(np.int16)).view(bf16)
    _same_bits(got, want)
    back = bf16_bits_to_fp32(want.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(torch.from_numpy(back)[~torch.isnan(x)], want.float()[~torch.isnan(x)])


@triton.jit
def _cast_kernel(x_ptr, y_ptr, z_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    y = tl.load(x_ptr + i, mask=m).to(tl.bfloat16)
    tl.store(y_ptr + i, y, mask=m)
    tl.store(z_ptr + i, y.to(tl.float32) * 2.0, mask=m)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # inf and bf16's max, doubled
def test_cast_to_bf16_rounds_to_nearest_even():
    x = torch.cat([_specials(), torch.randn(1000)])
    y = torch.empty(x.shape, dtype=bf16)
    z = torch.empty_like(x)
    _cast_kernel[(1,)](x, y, z, x.numel(), BLOCK=2048)
    _same_bits(y, x.to(bf16))
    ok = ~torch.isnan(x)
    assert torch.equal(z[ok], x.to(bf16).float()[ok] * 2)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b, out_dtype=tl.float32))


@pytest.mark.interpreter
def test_dot_of_bf16_operands():
    a, b = torch.randn(16, 32, dtype=bf16), torch.randn(32, 64, dtype=bf16)
    c = torch.empty(16, 64)
    _dot_kernel[(1,)](a, b, c, 16, 32, 64)
    want = a.double() @ b.double()  # products of bf16 are exact in fp32; sums to fp32 rounding
    torch.testing.assert_close(c.double(), want, rtol=2e-6, atol=2e-6)


def _triton_neg(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``-x`` of a float, on the GPU too: ``fneg`` from Triton 3.8 (``-(+0)`` is -0, as
    torch's), ``0 - x`` before (``semantic.minus``: ``-(+0)`` is +0)."""
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    return -x if (major, minor) >= (3, 8) else 0.0 - x


@triton.jit
def _elementwise_kernel(a_ptr, b_ptr, out_ptr, cmp_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    a = tl.load(a_ptr + i, mask=m)
    b = tl.load(b_ptr + i, mask=m)
    outs = (a + b, a - b, a * b, a / b, tl.maximum(a, b), tl.minimum(a, b),
            tl.where(a < b, a, b), -a, tl.abs(a), tl.fma(a, b, a), tl.clamp(a, -b.abs(), b.abs()))
    for j in tl.static_range(len(outs)):
        tl.store(out_ptr + j * n + i, outs[j], mask=m)
    tl.store(cmp_ptr + i, (a < b).to(tl.int8), mask=m)
    tl.store(cmp_ptr + n + i, (a >= b).to(tl.int8), mask=m)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # 0 / 0 on masked lanes
def test_elementwise_bf16_is_fp32_rounded():
    n = 1000
    a, b = torch.randn(n, dtype=bf16) * 3, torch.randn(n, dtype=bf16) * 3
    a[:2] = torch.tensor([0.0, -0.0])  # signed zeros (torch 2.11's bf16 randn gives some too)
    b[:2] = torch.tensor([1.5, -2.5])
    out = torch.empty(11, n, dtype=bf16)
    cmp = torch.empty(2, n, dtype=torch.int8)
    _elementwise_kernel[(1,)](a, b, out, cmp, n, BLOCK=1024)
    fa, fb = a.float(), b.float()
    # fma in double: a*b + a exact there for bf16 a, b (16 + 8 significant bits), then one rounding
    fma = (a.double() * b.double() + a.double()).float()
    want = [fa + fb, fa - fb, fa * fb, fa / fb, torch.maximum(fa, fb), torch.minimum(fa, fb),
            torch.where(fa < fb, fa, fb), _triton_neg(fa), fa.abs(), fma,
            torch.clamp(fa, -fb.abs(), fb.abs())]
    for j, w in enumerate(want):
        _same_bits(out[j], w.to(bf16))
    assert torch.equal(cmp[0].bool(), fa < fb) and torch.equal(cmp[1].bool(), fa >= fb)


@triton.jit
def _reduce_kernel(x_ptr, out_ptr, scan_ptr, R: tl.constexpr, C: tl.constexpr):
    r, c = tl.arange(0, R), tl.arange(0, C)
    x = tl.load(x_ptr + r[:, None] * C + c[None, :])
    tl.store(out_ptr + r, tl.sum(x, axis=1))
    tl.store(out_ptr + R + r, tl.max(x, axis=1))
    tl.store(out_ptr + 2 * R + r, tl.min(x, axis=1))
    tl.store(scan_ptr + r[:, None] * C + c[None, :], tl.cumsum(x, axis=1))


@pytest.mark.interpreter
def test_reductions_of_bf16():
    x = torch.randn(16, 32, dtype=bf16)
    out = torch.empty(3 * 16, dtype=bf16)
    scan = torch.empty(16, 32, dtype=bf16)
    _reduce_kernel[(1,)](x, out, scan, 16, 32)
    f = x.float()
    # one rounding of the fp32 sum (a GPU rounds at each step: within a few bf16 ulps of it)
    bound = 2 ** -8 * f.abs().sum(1) + 1e-30
    assert ((out[:16].float() - f.sum(1)).abs() <= bound).all()
    _same_bits(out[16:32], x.max(1).values)
    _same_bits(out[32:48], x.min(1).values)
    bound = 2 ** -8 * f.abs().cumsum(1) + 1e-30
    assert ((scan.float() - f.cumsum(1)).abs() <= bound).all()


def test_fix_is_a_no_op_once_applied():
    from triton.runtime import interpreter as I

    def patched():
        return (I.InterpreterBuilder.create_dot, I.InterpreterBuilder.cast_impl,
                I.ReduceOps.sum, I.ScanOps.cumsum, I._patch_lang_tensor)

    before = patched()
    fix_interpreter()
    assert patched() == before


@pytest.mark.interpreter
def test_unary_op_on_bf16_computes_on_values():
    """The interpreter's unary ops (``fneg``, which ``-x`` of a float is from Triton 3.8, and
    the math functions) see bf16 values, not their bits: unpatched, ``-0.75`` came out as
    ``-6.0`` (the bits' integer negation). Called on the builder, so every Triton version here
    takes the path."""
    from triton.runtime import interpreter

    x = torch.tensor([0.75, -2.5, 1.296875, 0.0, -0.0, 3.0e38, float("inf")], dtype=bf16)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    builder = interpreter.InterpreterBuilder()
    for op, want in ((np.negative, -x.float()), (np.abs, x.float().abs())):
        out = builder.unary_op(interpreter.TensorHandle(bits.copy(), tl.bfloat16), op)
        assert out.dtype.scalar == tl.bfloat16
        _same_bits(torch.from_numpy(out.data.view(np.int16)).view(bf16), want.to(bf16))

