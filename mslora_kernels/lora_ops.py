"""torch.library ops for the fused LoRA-family projection: declarations, fake impls, autograd.

One op serves Serial LoRA, MSPLoRA and plain LoRA, since each is ``y = x W^T + b + (x A^T) V^T``
with its own ``V`` (see :mod:`mslora_kernels.triton.lora_linear`):

- ``mslora::lora_linear(x, weight, bias, a, v, allow_tf32) -> (y, u)``, ``u = x A^T``;
- ``mslora::lora_linear_bwd_dx(g, weight, a, v, allow_tf32) -> (dx, du)``.

Both are ``triton_op``s, so ``torch.compile(fullgraph=True)`` traces their Python body (allocation
plus ``wrap_triton`` launches) and Inductor sees the kernels. Their fake impls allocate the outputs
alone (``kernels.outputs``, the launcher's own allocation), so that tracing on fake tensors
(``torch.export``, which keeps each op as one call) never runs a launcher: under Triton's
interpreter, the body's default fake impl launched the kernel on fake tensors and failed.
Autograd is registered on the forward op; the thin weight-gradient products (``dA = du^T x``,
``dV = g^T u``, a long reduction over the tokens) run as cuBLAS matmuls.

:func:`lora_linear` is the entry point the modules call: it validates (in Python, before any
launch), flattens the leading dimensions and returns ``y`` alone.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .triton import lora_linear as kernels
from .triton._common import wrap_triton

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = kernels.MAX_RANK


@triton_op("mslora::lora_linear", mutates_args=())
def _lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 a: torch.Tensor, v: torch.Tensor,
                 allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.lora_linear_fwd(x, weight, bias, a, v, allow_tf32, wrap=wrap_triton)


@triton_op("mslora::lora_linear_bwd_dx", mutates_args=())
def _lora_linear_bwd_dx(g: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, v: torch.Tensor,
                        allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.lora_linear_bwd_dx(g, weight, a, v, allow_tf32, wrap=wrap_triton)


@_lora_linear.register_fake
def _lora_linear_fake(x, weight, bias, a, v, allow_tf32):
    return kernels.outputs(x, weight.shape[0], a.shape[0])


@_lora_linear_bwd_dx.register_fake
def _lora_linear_bwd_dx_fake(g, weight, a, v, allow_tf32):
    return kernels.outputs(g, weight.shape[1], a.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, a, v, allow_tf32 = inputs
    _, u = output
    ctx.save_for_backward(x, weight, a, v, u)
    ctx.has_bias = bias is not None
    ctx.allow_tf32 = allow_tf32


def _backward(ctx, grad_y, grad_u):
    x, weight, a, v, u = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_v, _ = ctx.needs_input_grad
    g = grad_y.contiguous()
    dx = dw = db = da = dv = None
    if need_x or need_a:
        dx, du = torch.ops.mslora.lora_linear_bwd_dx(g, weight, a, v, ctx.allow_tf32)
        if grad_u is not None:  # u is an output too; honour a gradient that reached it
            du = du + grad_u
            dx = dx + grad_u @ a
        if need_a:
            da = du.t() @ x
    if need_v:
        dv = g.t() @ u
    if need_w:
        dw = g.t() @ x
    if need_b and ctx.has_bias:
        db = g.sum(0)
    return dx, dw, db, da, dv, None


_lora_linear.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_unavailable_reason(rank: int) -> str | None:
    """Why the fused op cannot take a (concatenated) rank of ``rank``, or None."""
    if rank > MAX_RANK:
        return f"the fused LoRA kernel takes a rank of at most {MAX_RANK}, got {rank}"
    return None


def _check(x, weight, bias, a, v) -> None:
    """Refuse, naming the problem, anything the kernel does not define."""
    named = {"x": x, "weight": weight, "a": a, "v": v}
    if bias is not None:
        named["bias"] = bias
    for n, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FUSED_DTYPES:
            raise TypeError(f"lora_linear: {n} has dtype {t.dtype}; the fused kernel takes "
                            "float32, float16 or bfloat16")
        if t.dtype != x.dtype:
            raise TypeError(f"lora_linear: {n} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {n} is on {t.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least one dimension (..., in_features)")
    if weight.dim() != 2 or a.dim() != 2 or v.dim() != 2:
        raise ValueError(f"lora_linear: weight, a and v must be 2-D, got shapes "
                         f"{tuple(weight.shape)}, {tuple(a.shape)}, {tuple(v.shape)}")
    n_out, k = weight.shape
    r = a.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features, weight expects {k}")
    if a.shape[1] != k:
        raise ValueError(f"lora_linear: a has shape {tuple(a.shape)}, expected (rank, {k})")
    if tuple(v.shape) != (n_out, r):
        raise ValueError(f"lora_linear: v has shape {tuple(v.shape)}, expected ({n_out}, {r})")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"lora_linear: bias has shape {tuple(bias.shape)}, expected ({n_out},)")
    reason = lora_linear_unavailable_reason(r)
    if reason is not None:
        raise ValueError(f"lora_linear: {reason}")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + (x A^T) V^T`` through the fused Triton kernel, any leading dimensions.

    All tensors share x's dtype (float32, float16 or bfloat16) and device. float32 products use
    TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set.
    """
    _check(x, weight, bias, a, v)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y, _ = torch.ops.mslora.lora_linear(x2, weight.contiguous(),
                                        None if bias is None else bias.contiguous(),
                                        a.contiguous(), v.contiguous(),
                                        bool(torch.backends.cuda.matmul.allow_tf32))
    return y.reshape(*lead, weight.shape[0])
