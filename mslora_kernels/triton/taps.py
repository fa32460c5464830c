"""The depthwise taps as the MSLoRA kernels read them: every path's (D, 1, k, k) weight packed
into one buffer, tap-major, in one launch.

Layout (``tap_offsets``): path i starts at element ``woff_i`` (a multiple of ``TAP_ALIGN``) and
holds its k_i * k_i taps one after another, each tap's D channels contiguous: element
``woff_i + (ty * k_i + tx) * D + ch`` is ``dw.i.weight[ch, 0, ty, tx]``. A program's
neighbouring lanes hold neighbouring channels, so the load of one tap is one contiguous run of
D elements (in the checkpoint's layout they lie k*k apart: a sector a lane at k = 7); each path
starting at a multiple of 16 elements lets those loads vectorise when D % 16 == 0. The padding
between paths is never read. The backward accumulates the taps' gradient in the same layout
(its finishing kernel turns it back into the checkpoint's).

``pack_taps`` replaces, per call, 1 (forward) or 2 (backward) small copies per path, a
concatenation and the int32 tables of the kernel sizes and offsets (one fill kernel per value,
as CUDA graph capture allows no host copy) with one launch, which also writes those tables;
``path_taps`` gives a kernel the same size and offset from the kernel sizes as scalars.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_PATHS, kernel_size_slots, wrap_triton
from ._compile import FP_FUSION, TRITON_DTYPE, CompileCase
from ._interpreter import fix_interpreter

fix_interpreter()

TAP_ALIGN = tl.constexpr(16)  # elements; each path's block starts at a multiple of this
BLOCK = 1024  # taps per program of the packing kernel


def _aligned(n: int) -> int:
    return triton.cdiv(n, TAP_ALIGN.value) * TAP_ALIGN.value


def tap_offsets(kernel_sizes, d: int) -> tuple[list[int], int]:
    """(woff_i for each path, the packed buffer's length in elements)."""
    offs, total = [], 0
    for k in kernel_sizes:
        offs.append(total)
        total += _aligned(d * k * k)
    return offs, total


@triton.jit
def path_taps(i, K0, K1, K2, K3, D):
    """(k_i, woff_i) of path i (a runtime index) from the kernel sizes K0..K3 (0: no path), as
    ``tap_offsets`` lays them out."""
    k = tl.where(i == 0, K0, tl.where(i == 1, K1, tl.where(i == 2, K2, K3)))
    s0 = (D * K0 * K0 + TAP_ALIGN - 1) // TAP_ALIGN * TAP_ALIGN
    s1 = (D * K1 * K1 + TAP_ALIGN - 1) // TAP_ALIGN * TAP_ALIGN
    s2 = (D * K2 * K2 + TAP_ALIGN - 1) // TAP_ALIGN * TAP_ALIGN
    woff = tl.where(i > 0, s0, 0) + tl.where(i > 1, s1, 0) + tl.where(i > 2, s2, 0)
    return k, tl.multiple_of(woff, TAP_ALIGN)


@triton.jit
def _pack_taps_kernel(w0_ptr, w1_ptr, w2_ptr, w3_ptr, out_ptr, ks_ptr, woffs_ptr, D, K0, K1, K2,
                      K3, BLOCK: tl.constexpr):
    """Pack the depthwise weights tap-major (module doc).

    Grid ``(cdiv(D * max(k)^2, BLOCK), number of paths)``: program (b, i) writes elements
    b*BLOCK ... of path i's block. w{i}_ptr: path i's weight, (D, 1, k_i, k_i) contiguous (an
    absent path's pointer is never read). out_ptr: the packed buffer, the weights' dtype.
    ks_ptr, woffs_ptr: int32 (number of paths,), path i's size and offset (program (0, i)).
    Reads gather (k*k apart), writes are contiguous; a few KB in all.
    """
    i = tl.program_id(1)
    k, woff = path_taps(i, K0, K1, K2, K3, D)
    if tl.program_id(0) == 0:
        tl.store(ks_ptr + i, k.to(tl.int32))
        tl.store(woffs_ptr + i, woff.to(tl.int32))
    kk = k * k
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # tap-major index: tap * D + ch
    m = e < D * kk
    src = (e % D) * kk + e // D
    if i == 0:
        v = tl.load(w0_ptr + src, mask=m)
    elif i == 1:
        v = tl.load(w1_ptr + src, mask=m)
    elif i == 2:
        v = tl.load(w2_ptr + src, mask=m)
    else:
        v = tl.load(w3_ptr + src, mask=m)
    tl.store(out_ptr + woff + e, v, mask=m)


def pack_taps(weights, kernel_sizes, d: int):
    """``(packed, offsets, ks, woffs)`` for the weights ``dw.{i}.weight`` (each (D, 1, k, k),
    contiguous, one dtype and device): the taps in ``tap_offsets``' layout, path i's offset as
    an int (for views), and int32 device tensors of every path's size and offset (for kernels
    that loop over the paths)."""
    nk = len(kernel_sizes)
    ws = [weights[f"dw.{i}.weight"] for i in range(nk)]
    offs, total = tap_offsets(kernel_sizes, d)
    dev = ws[0].device
    out = torch.empty((total,), dtype=ws[0].dtype, device=dev)
    ks_t = torch.empty((nk,), dtype=torch.int32, device=dev)
    woffs_t = torch.empty((nk,), dtype=torch.int32, device=dev)
    ptrs = ws + [ws[0]] * (MAX_PATHS - nk)
    grid = (triton.cdiv(d * max(kernel_sizes) ** 2, BLOCK), nk)
    wrap_triton(_pack_taps_kernel)[grid](*ptrs, out, ks_t, woffs_t, d,
                                           *kernel_size_slots(kernel_sizes), BLOCK=BLOCK,
                                           num_warps=4, num_stages=1, enable_fp_fusion=FP_FUSION)
    return out, offs, ks_t, woffs_t


def compile_cases() -> list[CompileCase]:
    """The packing kernel in each dtype (its sizes are runtime values)."""
    cases = []
    for dt in TRITON_DTYPE.values():
        sig = {f"w{i}_ptr": f"*{dt}" for i in range(MAX_PATHS)}
        sig.update({"out_ptr": f"*{dt}", "ks_ptr": "*i32", "woffs_ptr": "*i32", "D": "i32",
                    "K0": "i32", "K1": "i32", "K2": "i32", "K3": "i32", "BLOCK": "constexpr"})
        cases.append(CompileCase(f"pack_taps[{dt}]", _pack_taps_kernel, sig, {"BLOCK": BLOCK},
                                 num_warps=4, num_stages=1))
    return cases
