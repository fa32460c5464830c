"""Helpers shared by the Triton kernel modules (MSLoRA forward/backward, LoRA linear).

``wrap_triton(kernel)``: ``torch.library.wrap_triton``, through which every launch inside a
``triton_op`` goes, except that an interpreted kernel (``TRITON_INTERPRET=1``) is launched as it
is. torch 2.13 does that itself; torch 2.11 (the GPU machine's) refuses an ``InterpretedFunction``
("wrap_triton only works on functions annotated with triton.jit"), which would stop every op on
the CPU. Interpreted kernels run eagerly on CPU tensors and are never traced, so nothing is lost.
"""

from __future__ import annotations

# Limits of the fused MSLoRA kernels, checked by the op layer before any launch.
MAX_PATHS = 4  # kernel sizes served by one program (one fp32 accumulator tile each)
MAX_RANK = 512  # BLOCK_D beyond this leaves fewer than 16 pixels per tile (tl.dot needs 16)


def kernel_size_slots(kernel_sizes) -> list[int]:
    """The kernel sizes in the MAX_PATHS slots the kernels take as K0..K3 (0: no path)."""
    return list(kernel_sizes) + [0] * (MAX_PATHS - len(kernel_sizes))


def wrap_triton(kernel):
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def normalize_layout(x, data_format: str):
    """x as one of the three layouts the MSLoRA kernels address: NCHW contiguous, NCHW in
    ``torch.channels_last`` memory format, or (N, H, W, C) contiguous (``data_format=
    "channels_last"``). Any other strides are made contiguous in the nearest of these.

    Pure torch (no triton import), so the op layer's fake impls use the same rule."""
    import torch

    if data_format == "channels_last":
        return x.contiguous()
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 4 and x.stride(1) == 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def nchw_strides(x, data_format: str) -> tuple[int, int, int, int]:
    """Element strides of x in (n, c, h, w) order, for either ``data_format``."""
    if data_format == "channels_last":
        sn, sh, sw, sc = x.stride()
    else:
        sn, sc, sh, sw = x.stride()
    return sn, sc, sh, sw
