"""Which backend runs a call: the one named, or for ``"auto"`` the fastest usable one.

A backend named explicitly that cannot run on the input's device raises a ``RuntimeError`` that
names what is missing; nothing here ever falls back silently. Nothing here touches the GPU at
import time.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .config import validate_backend


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None if it can."""
    if importlib.util.find_spec("triton") is None:
        return "the Triton backend needs the 'triton' package, which is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            "the Triton backend runs on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing triton, or move the input to a CUDA device"
        )
    return f"the Triton backend does not support {device.type!r} tensors"


def cuda_extension():
    """The compiled extension ``mslora_kernels._C``, or None when it was not built."""
    try:
        from . import _C
    except ImportError:
        return None
    return _C


def cuda_unavailable_reason(device: torch.device) -> str | None:
    """Why the CUDA C++ backend cannot run on ``device``, or None if it can."""
    if cuda_extension() is None:
        return (
            "the CUDA backend needs the compiled extension mslora_kernels._C, which was not "
            "built (setup.py builds it only when nvcc is found and MSLORA_SKIP_CUDA_BUILD is unset)"
        )
    if device.type != "cuda":
        return f"the CUDA backend needs a CUDA tensor, got a {device.type!r} tensor"
    return None


def fused_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why a fused MSLoRA backend cannot serve ``device``, kernels included."""
    from . import ops  # late: ops imports the kernel layers lazily too

    reason = (triton_unavailable_reason if backend == "triton" else cuda_unavailable_reason)(device)
    return reason if reason is not None else ops.mslora_unavailable_reason(backend)


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run MSLoRA on ``device``, reference first."""
    device = torch.device(device)
    return ["reference"] + [
        b for b in ("triton", "cuda") if fused_unavailable_reason(b, device) is None
    ]


# "auto" on a CUDA device: the fused backends in the order the benchmarks rank them.
AUTO_ORDER_CUDA = ("triton", "cuda")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``reference``, ``triton`` or ``cuda``) for a call on ``device``."""
    validate_backend(backend)
    if backend == "reference":
        return backend
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        for b in AUTO_ORDER_CUDA:
            if fused_unavailable_reason(b, device) is None:
                return b
        return "reference"
    reason = fused_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"MSLoRA backend={backend!r} cannot run here: {reason}")
    return backend
