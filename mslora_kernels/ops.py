"""torch.library ops for the fused MSLoRA backends: declarations, fake impls, autograd.

The module layer calls :func:`mslora` with a concrete fused backend; this layer calls the Triton
launchers or the ``_C`` binding below it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import MSLoRAOptions

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mslora_unavailable_reason(backend: str) -> str | None:
    """Why the fused MSLoRA kernels of ``backend`` do not exist yet, or None."""
    return f"the {backend} MSLoRA kernels are not built yet"


def mslora(x: torch.Tensor, weights: Mapping[str, torch.Tensor], o: MSLoRAOptions,
           backend: str) -> torch.Tensor:
    raise NotImplementedError(mslora_unavailable_reason(backend))
