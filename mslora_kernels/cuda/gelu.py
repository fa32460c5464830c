"""Exact (erf) GELU through the CUDA kernel in csrc/gelu.cu: the trivial first CUDA case."""

from __future__ import annotations

import torch

from . import _ext


def gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """``GELU(x)`` (exact erf form) for a contiguous CUDA tensor of fp32, fp16 or bf16.

    Computes in fp32 and returns a new tensor of x's shape and dtype.
    """
    _ext.check_tensor("cuda gelu", "x", x)
    c = _ext.ext(x.device)
    y = torch.empty_like(x)
    with torch.cuda.device(x.device):
        code = c.gelu(_ext.DTYPE_CODE[x.dtype], x.data_ptr(), y.data_ptr(), x.numel(),
                      _ext.stream(x.device))
    _ext.check_launch("cuda gelu", code)
    return y
