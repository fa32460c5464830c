"""What is timed: one MSLoRA module with random weights, run by each provider.

Providers (all share the same weights, copied from one module):
- ``eager``: ``MSLoRA(backend="reference")``, the package's one reference;
- ``compile``: ``torch.compile`` of that module (default mode, static shapes);
- ``compile-max``: the same with ``mode="max-autotune-no-cudagraphs"`` (only with
  ``--max-autotune``): autotuned kernels, without the CUDA graphs that plain "max-autotune" adds,
  which no other provider gets, which hide their intermediates from the peak-memory count in a
  private pool, and whose replays overwrite the outputs that the bwd mode keeps;
- ``triton``: ``MSLoRA(backend="triton")``;
- ``cuda``: ``MSLoRA(backend="cuda")``;
- ``triton-compile``: ``torch.compile`` of ``MSLoRA(backend="triton")`` (default mode, static
  shapes; only when asked for): the fused module as a user who compiles the model gets it.
  Inductor compiles the Triton kernels itself, with the launch's ``num_warps`` and
  ``num_stages`` but not its other options (torch 2.11 to 2.15 drop fp32's ``maxnreg``), and
  launches them from its own wrapper. CUDA needs no such row: its op is opaque to Inductor.

A provider that cannot run here says why (``unavailable(...)``); the runner records that text.
"""

from __future__ import annotations

import math

import torch

from mslora_kernels import MSLoRA
from mslora_kernels.backends import DTYPE_NAMES

PROVIDERS = ("eager", "compile", "compile-max", "triton", "cuda", "triton-compile")
# The providers that run through torch.compile (whose bwd rows need a compile of their own).
COMPILED = ("compile", "compile-max", "triton-compile")
# The fused backends before torch.compile, whose cold compile is a group's slowest part: a run
# stopped by its time limit keeps their rows.
DEFAULT_PROVIDERS = ("eager", "triton", "cuda", "compile")
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def make_base(c: int, d: int, g: int, kernel_sizes, layout: str, dtype: torch.dtype,
              device: torch.device, seed: int = 0) -> MSLoRA:
    """The module every provider runs: random weights, ``up`` non-zero (a fresh adapter's zero
    ``up`` would make the whole branch dead weight), in the benchmark dtype."""
    gen = torch.Generator().manual_seed(seed)
    fmt = "channels_last" if layout == "channels_last" else "channels_first"
    m = MSLoRA(c, d, g, kernel_sizes, data_format=fmt, backend="reference")
    with torch.no_grad():
        for p in m.parameters():
            fan_in = max(1, p[0].numel())
            bound = 1.0 / math.sqrt(fan_in)
            p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
    return m.to(device=device, dtype=dtype)


def make_input(n: int, c: int, h: int, w: int, layout: str, dtype, device, seed: int,
               requires_grad: bool = True) -> torch.Tensor:
    """A random input in ``layout`` (see presets.LAYOUTS)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "channels_last":
        x = torch.randn(n, h, w, c, generator=gen)
    else:
        x = torch.randn(n, c, h, w, generator=gen)
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_first_cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device``, or None."""
    if provider in ("triton", "cuda", "triton-compile"):
        from mslora_kernels.backends import fused_unavailable_reason

        reason = fused_unavailable_reason(provider.removesuffix("-compile"), device)
        if reason is None and provider == "triton-compile" and device.type != "cuda":
            reason = ("torch.compile of the Triton backend needs a CUDA device: it cannot trace "
                      "Triton's interpreter (TRITON_INTERPRET=1)")
        return reason
    return None


def _fused(base: MSLoRA, backend: str) -> MSLoRA:
    """A fused-backend copy of ``base``: the same options, weights, device and dtype."""
    o = base.options
    m = MSLoRA(o.channels, o.rank, o.groups, o.kernel_sizes, data_format=o.data_format,
               backend=backend)
    p0 = next(base.parameters())
    m = m.to(device=p0.device, dtype=p0.dtype)
    m.load_state_dict(base.state_dict())
    return m


def build(provider: str, base: MSLoRA, compile_backend: str = "inductor"):
    """A callable module running ``base``'s weights with ``provider``; (callable, detail)."""
    if provider == "eager":
        return base, 'MSLoRA(backend="reference")'
    if provider in ("compile", "compile-max"):
        # One cache per module instance: forget earlier shapes, so that no run ever hits the
        # recompile limit (which would fall back to eager silently) or turns dynamic.
        torch._dynamo.reset()
        mode = "max-autotune-no-cudagraphs" if provider == "compile-max" else None
        fn = torch.compile(base, backend=compile_backend, mode=mode, dynamic=False)
        return fn, (f"torch.compile(reference, backend={compile_backend!r}, mode={mode!r}, "
                    "dynamic=False)")
    if provider in ("triton", "cuda"):
        return _fused(base, provider), f'MSLoRA(backend="{provider}")'
    if provider == "triton-compile":
        torch._dynamo.reset()  # as for "compile"
        fn = torch.compile(_fused(base, "triton"), backend=compile_backend, dynamic=False)
        return fn, (f'torch.compile(MSLoRA(backend="triton"), backend={compile_backend!r}, '
                    "dynamic=False)")
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
