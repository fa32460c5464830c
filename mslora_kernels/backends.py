"""Which backend runs a call: the one named, or for ``"auto"`` the fastest usable one.

A backend named explicitly that cannot run on the input's device raises a ``RuntimeError`` that
names what is missing; nothing here ever falls back silently. Nothing here touches the GPU at
import time.

Inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) only the reference can
run: the fused ops are ``torch.library`` custom ops, whose generated autograd torch.func refuses
(pytorch/pytorch#168393, #179652; the same holds for flash-attention's functions), and they have
no batching rule. ``"auto"`` picks the reference there; a fused backend named explicitly raises
an error that says so, where torch would raise one about autograd.Function internals.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from .config import MSLoRAOptions, validate_backend


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


def _load_extension():
    """``(mslora_kernels._C, None)``, or ``(None, why it cannot be had)``."""
    try:
        from . import _C
    except ImportError as e:
        # A missing file and one that fails to load both raise a plain ImportError ("cannot
        # import name '_C'", or the loader's message), so what lies in the package tells them
        # apart.
        here = Path(__file__).parent
        built = sorted(f.name for f in here.glob("_C.*") if f.suffix in (".so", ".pyd"))
        if not built:
            return None, (
                "which was not built (setup.py builds it only when nvcc is found and "
                "MSLORA_SKIP_CUDA_BUILD is unset)"
            )
        suffixes = importlib.machinery.EXTENSION_SUFFIXES  # the names this Python loads
        if not {"_C" + sfx for sfx in suffixes}.intersection(built):
            return None, (
                f"which was built for another Python ({', '.join(built)} in {here}; this Python "
                f"loads _C{suffixes[0]}): reinstall the package with this Python"
            )
        return None, f"which was built but does not load: {e}"
    return _C, None


def cuda_extension():
    """The compiled extension ``mslora_kernels._C``, or None when it was not built or does not
    load (:func:`cuda_unavailable_reason` says which)."""
    return _load_extension()[0]


def cuda_unavailable_reason(device: torch.device) -> str | None:
    """Why the CUDA C++ backend cannot run on ``device``, or None if it can."""
    ext, why = _load_extension()
    if ext is None:
        return f"the CUDA backend needs the compiled extension mslora_kernels._C, {why}"
    if device.type != "cuda":
        return f"the CUDA backend needs a CUDA tensor, got a {device.type!r} tensor"
    return None


# Fixed for the life of the process (installed packages, the built extension, the device type),
# so torch.compile evaluates it once while tracing instead of tracing the imports inside it
# (``importlib.import_module`` alone would break a ``fullgraph=True`` graph).
@torch.compiler.assume_constant_result
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


# "auto" on a CUDA device: the fused backend that the committed benchmark ranking says is faster
# for an input like this one (RANKING_PATH, written by ``python -m benchmarks.rank RUN_DIR`` from
# a GPU run's results); without a ranking, or for a dtype and layout it does not cover, the
# fused backends in this order.
AUTO_ORDER_CUDA = ("triton", "cuda")
RANKING_PATH = Path(__file__).with_name("auto_backend.json")
# The names the benchmarks (and so the ranking) give dtypes and layouts: one place for both.
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
LAYOUTS = ("channels_first", "channels_first_cl", "channels_last")


@functools.cache
def _ranking(path: Path | None = None) -> tuple[dict, ...]:
    path = RANKING_PATH if path is None else path
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text())["rows"])


# The ranking as torch.compile sees it: read when tracing (the file is fixed for the process),
# never traced (file I/O inside a traced function breaks a fullgraph=True graph).
@torch.compiler.assume_constant_result
def _ranking_rows() -> tuple[dict, ...]:
    return _ranking()


def layout_name(x: torch.Tensor, data_format: str) -> str:
    """The benchmark's name of x's layout (one of LAYOUTS): channels_first, channels_first_cl
    (an (N, C, H, W) tensor in torch.channels_last memory format), channels_last."""
    if data_format == "channels_last":
        return "channels_last"
    cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return "channels_first_cl" if cl else "channels_first"


def nearest_winner(rows, dtype_name: str | None, layout: str, c: int, hw: int | None,
                   d: int) -> str | None:
    """The winner of the ranking rows nearest to (C, H*W, D) among those of the same dtype and
    layout (distance: sum of |log ratio| of C, H*W and D; H*W left out when ``hw`` is None);
    when several rows are equally near, the backend most of them chose (ties in
    AUTO_ORDER_CUDA's order). None when no row has the dtype and layout."""
    same = [r for r in rows if r["dtype"] == dtype_name and r["layout"] == layout]
    if not same:
        return None
    dists = []
    for r in same:
        dist = 0.0
        for got, want in ((c, r["C"]), (hw, r["H"] * r["W"]), (d, r["D"])):
            if got is not None:
                dist += abs(math.log(want / got))
        dists.append(dist)
    closest = min(dists)
    nearest = [r["winner"] for r, dist in zip(same, dists, strict=True) if dist == closest]
    return max(AUTO_ORDER_CUDA, key=nearest.count)  # the first of equals wins a tie


def ranked_backend(dtype: torch.dtype, layout: str, c: int, hw: int | None, d: int,
                   rows: tuple[dict, ...] | None = None) -> str | None:
    """The faster fused backend measured on the benchmark shape nearest to (C, H*W, D) (see
    :func:`nearest_winner`; ``hw=None`` leaves the map size out), from ``rows`` or the committed
    ranking."""
    rows = _ranking_rows() if rows is None else rows
    return nearest_winner(rows, DTYPE_NAMES.get(dtype), layout, c, hw, d)


def in_func_transform(*tensors: torch.Tensor | None) -> bool:
    """Whether any of ``tensors`` is a ``torch.func`` transform's wrapper (grad, vmap, jvp...).
    False while torch.compile traces (Dynamo's own handling of torch.func applies there)."""
    functorch = torch._C._functorch
    if torch.compiler.is_compiling() or functorch.peek_interpreter_stack() is None:
        return False  # the second: no transform is running (one call, the usual case)
    wrapped = functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t) for t in tensors)


def func_transform_error(what: str) -> RuntimeError:
    """The error for a fused backend named explicitly inside a torch.func transform."""
    return RuntimeError(
        f"{what} cannot run inside a torch.func transform (grad, vmap, jacrev, ...): its fused "
        "ops are torch.library custom ops, whose autograd torch.func does not support "
        "(pytorch/pytorch#168393) and which have no batching rule; use backend='reference' "
        "(or 'auto', which picks the reference there) for torch.func")


def resolve_backend(backend: str, device: torch.device, x: torch.Tensor | None = None,
                    options: MSLoRAOptions | None = None, transformed: bool = False) -> str:
    """The concrete backend (``reference``, ``triton`` or ``cuda``) for a call on ``device``.

    For ``"auto"`` with the input ``x`` and the module's ``options`` given, the benchmark ranking
    picks between the usable fused backends (see :func:`ranked_backend`). Under
    ``torch.compile`` it ranks on C and D alone, leaving out H*W: the sizes may be symbolic
    there (dynamic shapes), and a choice that depended on them would fail to trace or tie the
    compiled graph to one map size. ``transformed``: the call's tensors are a torch.func
    transform's (:func:`in_func_transform`), where only the reference runs.
    """
    validate_backend(backend)
    if backend == "reference":
        return backend
    if backend == "auto":
        if device.type != "cuda" or transformed:
            return "reference"
        order = AUTO_ORDER_CUDA
        if x is not None and options is not None:
            hw = None
            if not torch.compiler.is_compiling():
                h, w = x.shape[-3:-1] if options.data_format == "channels_last" else x.shape[-2:]
                hw = h * w
            best = ranked_backend(x.dtype, layout_name(x, options.data_format), options.channels,
                                  hw, options.rank)
            if best is not None:
                order = (best, *[b for b in AUTO_ORDER_CUDA if b != best])
        for b in order:
            if fused_unavailable_reason(b, device) is None:
                return b
        return "reference"
    reason = fused_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"MSLoRA backend={backend!r} cannot run here: {reason}")
    if transformed:
        raise func_transform_error(f"MSLoRA backend={backend!r}")
    return backend
