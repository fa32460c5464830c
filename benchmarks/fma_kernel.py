"""The Triton kernel behind the FMA floor's rate (``measure.fma_rate``), bound by fp32 FMAs.

Imported on first use only: the benchmarks run without Triton, and a jit function is interpreted
or compiled as ``TRITON_INTERPRET`` says when it is decorated. Its one configuration compiles
in the Triton compile check:
``python -m mslora_kernels.checks.triton_compile --module benchmarks.fma_kernel --only-module``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mslora_kernels.triton._compile import FP_FUSION, CompileCase

from .measure import FMA_BLOCK, FMA_ITERS, FMA_WARPS


@triton.jit
def _fma_bound_kernel(x_ptr, out_ptr, n, b, c, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Per element, 8 independent chains (measure.FMA_CHAINS) of ``a = a * b + c``, each step
    one FMA (FP fusion pinned on, as in the package's kernels), ``ITERS`` iterations, one load
    and one store.

    Args: x_ptr/out_ptr (fp32, n elements), n, b and c (fp32 scalars the compiler cannot fold),
    ITERS (iterations of the 8 chains), BLOCK (elements per program, one per thread-lane).
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a0 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    a1 = a0 + 0.1
    a2 = a0 + 0.2
    a3 = a0 + 0.3
    a4 = a0 + 0.4
    a5 = a0 + 0.5
    a6 = a0 + 0.6
    a7 = a0 + 0.7
    for _ in range(ITERS):
        a0 = a0 * b + c
        a1 = a1 * b + c
        a2 = a2 * b + c
        a3 = a3 * b + c
        a4 = a4 * b + c
        a5 = a5 * b + c
        a6 = a6 * b + c
        a7 = a7 * b + c
    tl.store(out_ptr + offs, ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)), mask=mask)


def run(x: torch.Tensor, b: float, c: float, iters: int) -> torch.Tensor:
    """The kernel over ``x`` (fp32, contiguous), ``iters`` iterations; a fresh output."""
    out = torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), FMA_BLOCK),)
    _fma_bound_kernel[grid](x, out, x.numel(), b, c, ITERS=iters, BLOCK=FMA_BLOCK,
                            num_warps=FMA_WARPS, enable_fp_fusion=FP_FUSION)
    return out


def compile_cases() -> list[CompileCase]:
    """The one configuration ``run`` launches (``measure.fma_rate``'s iterations)."""
    return [CompileCase("bench_fma_bound", _fma_bound_kernel,
                        {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "b": "fp32",
                         "c": "fp32", "ITERS": "constexpr", "BLOCK": "constexpr"},
                        {"ITERS": FMA_ITERS, "BLOCK": FMA_BLOCK}, num_warps=FMA_WARPS)]
