"""What every CUDA launcher shares: the extension handle, dtype codes, checks, error handling."""

from __future__ import annotations

import torch

from ..backends import cuda_extension, cuda_unavailable_reason

# The DType codes of csrc/common.cuh.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def ext(device: torch.device):
    """The ``_C`` module, or a RuntimeError saying why the CUDA backend cannot serve ``device``."""
    reason = cuda_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)
    return cuda_extension()


def check_tensor(op: str, name: str, t: torch.Tensor, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, contiguous: bool = True) -> None:
    """Refuse, naming the problem, a tensor a raw-pointer kernel cannot take."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{op}: {name} must be a CUDA tensor, got one on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if t.dtype not in DTYPE_CODE:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()})")


def stream(device: torch.device) -> int:
    """The current CUDA stream on ``device`` as an int, for the binding."""
    return torch.cuda.current_stream(device).cuda_stream


def check_launch(op: str, code: int) -> None:
    """Raise with the CUDA runtime's message when a launch returned an error code."""
    if code != 0:
        raise RuntimeError(f"{op}: CUDA error {code}: {cuda_extension().error_string(code)}")
