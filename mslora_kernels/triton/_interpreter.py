"""Two fixes to Triton's CPU interpreter (``TRITON_INTERPRET=1``), so that kernels run there
compute what they compute on a GPU. :func:`fix_interpreter` applies both; it is a no-op when the
interpreter is not in use or already fixed, and compiled GPU kernels never see it.

NumPy >= 2.4. The interpreter (3.6) turns a scalar kernel argument used as a loop bound
(``for k in range(0, C, BLOCK)``) into a Python int with ``int(array)`` on a one-element 1-D
array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
scalars"). The fix converts through the first element.

bfloat16. NumPy has no bfloat16, so the interpreter keeps a bf16 value as its 16 bits in a
``uint16`` array, and every operation that does arithmetic on those arrays treats the bits as
integers: ``tl.dot`` on bf16 operands multiplies the integers (garbage; seen with triton
3.3-3.9), as would an add, a comparison or a sum of bf16 values; and a cast from fp32 to bf16
truncates where the GPU rounds to nearest even. The fix does what the GPU does:

- a cast to bf16 rounds to nearest even (from fp32; any other source goes through fp32 first,
  exact for fp16 and for integers below 2**24);
- a cast from bf16 first widens the bits to fp32 exactly;
- ``tl.dot`` multiplies bf16 operands widened to fp32, exactly (an MMA's products of bf16
  values are exact and summed in fp32);
- elementwise arithmetic, comparisons, negation (Triton >= 3.8 negates a float with ``fneg``,
  which the interpreter applies to the bits: ``-0.75`` came out as ``-6.0``), ``fma``,
  ``clamp``, the ``sum`` / ``min`` / ``max`` reductions and ``cumsum`` / ``cumprod`` on bf16
  compute in fp32 and round the result to bf16, as the GPU does for one operation (a sum
  rounds once, where the GPU's tree of bf16 adds rounds at every step). Triton's math
  functions (exp, erf, sqrt, ...) take only fp32 or fp64, on a GPU as here;
- an atomic on bf16 values, which no kernel here issues, is refused rather than computed on bits.

Only the bf16 paths change: every other dtype runs the interpreter's own code.
"""

from __future__ import annotations

import os

import numpy as np

_COMPARISONS = (np.less, np.greater, np.less_equal, np.greater_equal, np.equal, np.not_equal)


def fix_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    _fix_numpy2()
    _fix_bf16()


def _fix_numpy2() -> None:
    from triton.runtime import interpreter

    orig = interpreter._patch_lang_tensor
    if getattr(orig, "_mslora_fixed", False):
        return

    def index(self):
        return int(self.handle.data.reshape(-1)[0])

    def patched(tensor, *scope):  # (tensor, scope) in Triton 3.6; (tensor) in 3.3
        orig(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._mslora_fixed = True
    interpreter._patch_lang_tensor = patched


# --- bf16 bits <-> fp32 values -------------------------------------------------------------


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bf16 values kept as uint16 bits -> float32, exactly (bf16 is fp32's upper half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values -> bf16 bits (uint16), rounded to nearest even as the GPU's cvt.rn.bf16
    does: overflow goes to inf, NaN stays a (quiet) NaN of the same sign."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if np.any(nan):
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded.reshape(f.shape)


def _fix_bf16() -> None:
    import triton.language as tl
    from triton.runtime import interpreter as I

    B = I.InterpreterBuilder
    if getattr(B, "_mslora_bf16_fixed", False):
        return
    bf16, fp32 = tl.bfloat16, tl.float32

    def is_bf16(h) -> bool:
        return isinstance(h, I.TensorHandle) and h.dtype.scalar == bf16

    def widen(h):
        return I.TensorHandle(bf16_bits_to_fp32(h.data), fp32) if is_bf16(h) else h

    def narrow(h):
        return I.TensorHandle(fp32_to_bf16_bits(h.data), bf16)

    orig_cast, orig_binary, orig_unary, orig_dot = (B.cast_impl, B.binary_op, B.unary_op,
                                                    B.create_dot)
    orig_fma, orig_clamp, orig_rmw = B.create_fma, B.create_clampf, B.create_atomic_rmw

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == bf16 and src.dtype.scalar != bf16:
            return I.TensorHandle(fp32_to_bf16_bits(np.asarray(widen(src).data, np.float32)), bf16)
        return orig_cast(self, widen(src), dst_type)

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return orig_binary(self, lhs, rhs, op)
        out = orig_binary(self, widen(lhs), widen(rhs), op)
        return out if op in _COMPARISONS else narrow(out)

    def unary_op(self, arg, op):  # of those that take bf16, fneg (Triton >= 3.8's -x)
        if not is_bf16(arg):
            return orig_unary(self, arg, op)
        return narrow(orig_unary(self, widen(arg), op))

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def create_fma(self, x, y, z):
        if not is_bf16(z):
            return orig_fma(self, x, y, z)
        return narrow(orig_fma(self, widen(x), widen(y), widen(z)))

    def create_clampf(self, arg, lo, hi, propagate_nans):
        if not is_bf16(arg):
            return orig_clamp(self, arg, lo, hi, propagate_nans)
        return narrow(orig_clamp(self, widen(arg), widen(lo), widen(hi), propagate_nans))

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        if is_bf16(val):
            raise NotImplementedError("the Triton interpreter keeps bfloat16 as integer bits; "
                                      "an atomic on bfloat16 values is not emulated")
        return orig_rmw(self, rmwOp, ptr, val, mask, sem, scope)

    B.cast_impl = cast_impl  # every create_*_to_* / fp_ext / fp_trunc calls it
    B.binary_op, B.unary_op, B.create_fma = binary_op, unary_op, create_fma
    B.create_clampf, B.create_atomic_rmw = create_clampf, create_atomic_rmw
    B.create_dot = create_dot

    orig_sum, orig_min_max = I.ReduceOps.sum, I.ReduceOps.min_max

    def typed(t, handle, dt):  # a tl tensor of t's shape holding handle, element type dt
        return tl.core.tensor(handle, tl.block_type(dt, list(t.type.shape))
                              if t.type.is_block() else dt)

    def as_fp32(t):
        return typed(t, widen(t.handle), fp32)

    def back_to_bf16(t):
        return typed(t, narrow(t.handle), bf16)

    def reduce_sum(self, input):
        if input.dtype != bf16:
            return orig_sum(self, input)
        return back_to_bf16(orig_sum(self, as_fp32(input)))

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        val = input[0] if isinstance(input, tuple) else input
        if val.dtype != bf16:
            return orig_min_max(self, input, val_reduce_op, idx_reduce_op)
        out = orig_min_max(self, as_fp32(val), val_reduce_op, idx_reduce_op)
        if val_reduce_op is None:
            return out
        return (back_to_bf16(out[0]), out[1]) if idx_reduce_op else back_to_bf16(out)

    I.ReduceOps.sum, I.ReduceOps.min_max = reduce_sum, min_max

    def scan(orig):
        def op(self, input):
            if input.dtype != bf16:
                return orig(self, input)
            return [back_to_bf16(t) for t in orig(self, as_fp32(input))]
        return op

    I.ScanOps.cumsum, I.ScanOps.cumprod = scan(I.ScanOps.cumsum), scan(I.ScanOps.cumprod)
    B._mslora_bf16_fixed = True
