"""Element-wise exact (erf) GELU: the first, trivial kernel that proves the harness end to end."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compile import FP_FUSION, TRITON_DTYPE, CompileCase
from ._interpreter import fix_interpreter

fix_interpreter()

# The one configuration the launcher uses; the compile check builds exactly this list.
GELU_CONFIGS = ({"BLOCK": 1024, "num_warps": 4},)


@triton.jit
def gelu_fp32(x):
    """Exact GELU of an fp32 block: x * Phi(x)."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = GELU(x) over a flat, contiguous tensor of ``n`` elements.

    One program per BLOCK consecutive elements; the tail is masked. Computes in fp32 and stores
    in y's dtype.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, gelu_fp32(x).to(y_ptr.dtype.element_ty), mask=mask)


def gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU of ``x`` (fp32, fp16 or bf16, any shape) in a fresh contiguous tensor."""
    if x.dtype not in TRITON_DTYPE:
        raise TypeError(f"gelu: dtype {x.dtype} not supported; use float32, float16 or bfloat16")
    x = x.contiguous()
    y = torch.empty_like(x)
    cfg = GELU_CONFIGS[0]
    n = x.numel()
    if n:
        _gelu_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](x, y, n, BLOCK=cfg["BLOCK"],
                                                      num_warps=cfg["num_warps"],
                                                      enable_fp_fusion=FP_FUSION)
    return y


def compile_cases() -> list[CompileCase]:
    return [
        CompileCase(f"gelu[{dt},BLOCK={c['BLOCK']}]", _gelu_kernel,
                    {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "n": "i32", "BLOCK": "constexpr"},
                    {"BLOCK": c["BLOCK"]}, num_warps=c["num_warps"])
        for dt in TRITON_DTYPE.values() for c in GELU_CONFIGS
    ]
