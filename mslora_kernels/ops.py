"""torch.library ops for the fused MSLoRA backends: declarations, fake impls, autograd.

The module layer calls :func:`mslora` with a concrete fused backend; this layer calls the Triton
launchers (``mslora_kernels.triton.mslora_fwd`` / ``mslora_bwd``) or the CUDA binding
(``mslora_kernels.cuda.mslora``) below it. Four ops, declared once each:

- ``mslora::triton_fwd``, ``mslora::triton_bwd``: ``torch.library.triton_op`` (the launchers
  launch through ``wrap_triton``, so Inductor sees the kernels under ``torch.compile``);
- ``mslora::cuda_fwd``, ``mslora::cuda_bwd``: ``torch.library.custom_op`` over the compiled
  extension (imported lazily, at the first call).

Op arguments encode :class:`~mslora_kernels.config.MSLoRAOptions` as plain values:
``x, weights (list, in WEIGHT ORDER: see weight_names), groups, kernel_sizes, prenorm, enhance,
pool, gate, shuffle, channels_last, deterministic``; channels and rank come from the shapes.
``*_fwd`` returns ``(out, zmean)``; zmean is the (N, D) fp32 mean of z over H and W when
``pool``, else an empty (0,) tensor. Autograd (``register_autograd``) saves x, the weights and
zmean only; everything D-sized is recomputed in the backward op, which returns
``[grad_x, flat]``: ``flat`` is every weight gradient flattened and concatenated in weight order
(one tensor, because a custom op's outputs may not alias each other and launchers may hand back
views of one reduction buffer); :func:`split_weight_grads` cuts it back into the weights'
shapes outside the op.

``deterministic`` only matters for the backward: False (the default of the module) lets weight
gradients accumulate with atomics (fast, run-to-run bitwise differences possible); True asks for
bitwise-reproducible gradients (fixed-order reductions). The module also turns it on under
``torch.use_deterministic_algorithms(True)``.

Autocast: the ops themselves are autocast-agnostic; ``MSLoRA.forward`` casts x and the weights to
the autocast dtype and calls the op with autocast disabled, which traces without a graph break.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .config import MSLoRAOptions, weight_shapes
from .triton._common import MAX_PATHS, MAX_RANK, normalize_layout

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPTION_FLAGS = ("prenorm", "enhance", "pool", "gate", "shuffle")


# ------------------------------------------------------------------------------------------
# Encoding MSLoRAOptions as op arguments
# ------------------------------------------------------------------------------------------
def weight_names(o: MSLoRAOptions) -> list[str]:
    """The checkpoint names of the weights the ops take, in the ops' order."""
    return list(weight_shapes(o))


def op_args(o: MSLoRAOptions) -> tuple:
    """The option arguments of every op, after x / weights: groups, kernel sizes, flags, layout."""
    return (o.groups, list(o.kernel_sizes), *(getattr(o, f) for f in OPTION_FLAGS),
            o.data_format == "channels_last")


def _options(x: Tensor, weights: Sequence[Tensor], groups: int, kernel_sizes: Sequence[int],
             prenorm: bool, enhance: bool, pool: bool, gate: bool, shuffle: bool,
             channels_last: bool) -> MSLoRAOptions:
    channels = x.shape[3] if channels_last else x.shape[1]
    rank = weights[0].shape[0]  # proj.weight: (D, C/G, 1, 1)
    return MSLoRAOptions(int(channels), int(rank), int(groups), tuple(kernel_sizes), prenorm,
                         enhance, pool, gate, shuffle,
                         "channels_last" if channels_last else "channels_first")


def _zmean_or_empty(zmean: Tensor | None, x: Tensor) -> Tensor:
    return zmean if zmean is not None else x.new_empty((0,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# Fake impls (shared by both backends)
# ------------------------------------------------------------------------------------------
def _fwd_fake(x, weights, groups, kernel_sizes, prenorm, enhance, pool, gate, shuffle,
              channels_last, deterministic):
    fmt = "channels_last" if channels_last else "channels_first"
    out = torch.empty_like(normalize_layout(x, fmt))
    n, d = x.shape[0], weights[0].shape[0]
    zmean = x.new_empty((n, d) if pool else (0,), dtype=torch.float32)
    return out, zmean


def _bwd_fake(grad_out, x, weights, zmean, groups, kernel_sizes, prenorm, enhance, pool, gate,
              shuffle, channels_last, deterministic):
    fmt = "channels_last" if channels_last else "channels_first"
    total = sum(w.numel() for w in weights)
    return [torch.empty_like(normalize_layout(x, fmt)), weights[0].new_empty((total,))]


def split_weight_grads(flat: Tensor, weights: Sequence[Tensor]) -> list[Tensor]:
    """The backward op's flat weight gradients cut back into the weights' shapes."""
    sizes = [w.numel() for w in weights]
    return [g.view(w.shape) for g, w in zip(flat.split(sizes), weights, strict=True)]


# ------------------------------------------------------------------------------------------
# Triton ops
# ------------------------------------------------------------------------------------------
@torch.library.triton_op("mslora::triton_fwd", mutates_args=())
def triton_fwd(x: Tensor, weights: list[Tensor], groups: int, kernel_sizes: list[int],
               prenorm: bool, enhance: bool, pool: bool, gate: bool, shuffle: bool,
               channels_last: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    from .triton.mslora_fwd import mslora_fwd

    o = _options(x, weights, groups, kernel_sizes, prenorm, enhance, pool, gate, shuffle,
                 channels_last)
    out, zmean = mslora_fwd(x, dict(zip(weight_names(o), weights, strict=True)), o)
    return out, _zmean_or_empty(zmean, x)


def _triton_bwd_launcher():
    try:
        from .triton.mslora_bwd import mslora_bwd_flat
    except ImportError as e:
        raise NotImplementedError(
            "MSLoRA backend='triton': the backward kernels (mslora_kernels.triton.mslora_bwd) "
            f"are not available in this build ({e})"
        ) from e
    return mslora_bwd_flat


@torch.library.triton_op("mslora::triton_bwd", mutates_args=())
def triton_bwd(grad_out: Tensor, x: Tensor, weights: list[Tensor], zmean: Tensor, groups: int,
               kernel_sizes: list[int], prenorm: bool, enhance: bool, pool: bool, gate: bool,
               shuffle: bool, channels_last: bool, deterministic: bool) -> list[Tensor]:
    mslora_bwd_flat = _triton_bwd_launcher()
    o = _options(x, weights, groups, kernel_sizes, prenorm, enhance, pool, gate, shuffle,
                 channels_last)
    # the launcher writes the weight gradients flat, in weight_names order, in one kernel
    grad_x, flat = mslora_bwd_flat(grad_out, x, dict(zip(weight_names(o), weights, strict=True)),
                                   o, zmean if pool else None, deterministic)
    return [grad_x, flat]


# ------------------------------------------------------------------------------------------
# CUDA ops (the compiled extension, through mslora_kernels.cuda.mslora)
# ------------------------------------------------------------------------------------------
CUDA_MODULE = "mslora_kernels.cuda.mslora"


def _cuda_launchers():
    return importlib.import_module(CUDA_MODULE)


@torch.library.custom_op("mslora::cuda_fwd", mutates_args=())
def cuda_fwd(x: Tensor, weights: list[Tensor], groups: int, kernel_sizes: list[int],
             prenorm: bool, enhance: bool, pool: bool, gate: bool, shuffle: bool,
             channels_last: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    o = _options(x, weights, groups, kernel_sizes, prenorm, enhance, pool, gate, shuffle,
                 channels_last)
    wdict = dict(zip(weight_names(o), weights, strict=True))
    out, zmean = _cuda_launchers().mslora_fwd(x, wdict, o)
    return out, _zmean_or_empty(zmean, x)


@torch.library.custom_op("mslora::cuda_bwd", mutates_args=())
def cuda_bwd(grad_out: Tensor, x: Tensor, weights: list[Tensor], zmean: Tensor, groups: int,
             kernel_sizes: list[int], prenorm: bool, enhance: bool, pool: bool, gate: bool,
             shuffle: bool, channels_last: bool, deterministic: bool) -> list[Tensor]:
    o = _options(x, weights, groups, kernel_sizes, prenorm, enhance, pool, gate, shuffle,
                 channels_last)
    wdict = dict(zip(weight_names(o), weights, strict=True))
    # the launcher writes the weight gradients flat, in weight_names order, in one kernel
    grad_x, flat = _cuda_launchers().mslora_bwd_flat(grad_out, x, wdict, o,
                                                     zmean if pool else None, deterministic)
    return [grad_x, flat]


# ------------------------------------------------------------------------------------------
# Fake impls and autograd, registered once for each (fwd, bwd) pair
# ------------------------------------------------------------------------------------------
def _register(fwd, bwd) -> None:
    fwd.register_fake(_fwd_fake)
    bwd.register_fake(_bwd_fake)

    def setup_context(ctx, inputs, output):
        x, weights, *args = inputs
        _, zmean = output
        ctx.save_for_backward(x, zmean, *weights)
        ctx.args = args  # groups, kernel_sizes, flags, channels_last, deterministic
        ctx.mark_non_differentiable(zmean)

    def backward(ctx, grad_out, _grad_zmean):
        x, zmean, *weights = ctx.saved_tensors
        grad_x, flat = bwd(grad_out, x, weights, zmean, *ctx.args)
        return (grad_x, split_weight_grads(flat, weights)) + (None,) * len(ctx.args)

    fwd.register_autograd(backward, setup_context=setup_context)


_register(triton_fwd, triton_bwd)
_register(cuda_fwd, cuda_bwd)

_OPS = {"triton": (triton_fwd, triton_bwd), "cuda": (cuda_fwd, cuda_bwd)}


# ------------------------------------------------------------------------------------------
# Entry points for the module layer
# ------------------------------------------------------------------------------------------
def mslora_unavailable_reason(backend: str) -> str | None:
    """Why the fused MSLoRA kernels of ``backend`` cannot be used, or None when they exist."""
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton MSLoRA kernels need the 'triton' package, which is not installed"
        return None
    if backend == "cuda":
        try:
            importlib.import_module(CUDA_MODULE)
        except ImportError as e:
            return f"the cuda MSLoRA launchers ({CUDA_MODULE}) cannot be imported: {e}"
        from .backends import cuda_extension

        if cuda_extension() is None:
            return "the cuda MSLoRA kernels need the compiled extension mslora_kernels._C"
        return None
    return f"{backend!r} is not a fused MSLoRA backend (expected 'triton' or 'cuda')"


def check_fused_input(x: Tensor, weights: Mapping[str, Tensor], o: MSLoRAOptions) -> None:
    """Refuse, before any launch, what the fused kernels do not take."""
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"MSLoRA fused backends take float32, float16 or bfloat16 input, "
                        f"got dtype {x.dtype} (use backend='reference' for {x.dtype})")
    for name in weight_names(o):
        if name not in weights:
            raise ValueError(f"MSLoRA: missing weight {name!r}")
        w = weights[name]
        if w.dtype != x.dtype:
            raise TypeError(f"MSLoRA: weight {name!r} has dtype {w.dtype} but the input has "
                            f"{x.dtype}; cast both to one compute dtype")
        if w.device != x.device:
            raise ValueError(f"MSLoRA: weight {name!r} is on {w.device} but the input is on "
                             f"{x.device}")
    if len(o.kernel_sizes) > MAX_PATHS:
        raise ValueError(f"MSLoRA fused backends: at most {MAX_PATHS} kernel sizes, got "
                         f"{len(o.kernel_sizes)} ({o.kernel_sizes}); use backend='reference'")
    if o.rank > MAX_RANK:
        raise ValueError(f"MSLoRA fused backends: rank {o.rank} exceeds the maximum "
                         f"{MAX_RANK}; use backend='reference'")


def mslora(x: Tensor, weights: Mapping[str, Tensor], o: MSLoRAOptions, backend: str,
           deterministic: bool = False) -> Tensor:
    """``x + H(x)`` through the fused ``backend`` ('triton' or 'cuda'), differentiable."""
    if backend not in _OPS:
        raise ValueError(f"MSLoRA: {backend!r} is not a fused backend (expected 'triton' or "
                         "'cuda')")
    check_fused_input(x, weights, o)
    fwd, _ = _OPS[backend]
    out, _ = fwd(x, [weights[n] for n in weight_names(o)], *op_args(o), deterministic)
    return out
