"""The workspace budget of the fused backends: how many images one launch sequence takes.

The fused MSLoRA launchers (Triton and CUDA) allocate transient per-pixel workspaces (z, the
backward's dc_i / du or the CUDA backward's D-channel buffers) that would grow with N*H*W. Every
quantity of MSLoRA is per image except the weight gradients, which are sums over N*H*W (pool's
mean is per image, LayerNorm per pixel). So the launchers run over *slices of whole images*,
each slice's workspaces at most :func:`workspace_budget` bytes, and sum the weight gradients
across slices: exact up to the summation order (Liger-Kernel's chunked fused linear
cross-entropy does the same).

``MSLORA_WORKSPACE_MB`` (default 64) sets the budget in MiB. It is read when a launcher runs
(under ``torch.compile``: when it traces). A compiled graph has a fixed number of slices; with
dynamic shapes their sizes stay symbolic, so the graph serves every batch that gives the same
count (the launchers run once per slice, so a batch that needs more slices recompiles). The
budget is not part of torch.compile's cache keys: a Triton-backend graph that Inductor's or
AOTAutograd's on-disk cache kept from another process keeps the slicing it was traced with
(only memory, never results, depends on it). Set the variable the same way for runs that share
a cache, or turn the caches off (``torch.compiler.config.force_disable_caches``) when changing
it.

A slice also never holds more than :data:`MAX_IMAGES_PER_SLICE` images: both backends launch a
slice's images along grid axis 1, which CUDA caps at 65535 blocks, so any batch size runs (a
batch of many tiny maps, which the byte budget alone would put in one slice, included).
"""

from __future__ import annotations

import os

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

ENV_VAR = "MSLORA_WORKSPACE_MB"
DEFAULT_MB = 64
MAX_IMAGES_PER_SLICE = 65535  # CUDA's gridDim.y limit: the launchers put images on grid axis 1


def workspace_budget() -> int:
    """The per-slice workspace budget in bytes: ``MSLORA_WORKSPACE_MB`` MiB, default 64."""
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        return DEFAULT_MB << 20
    try:
        mb = int(raw.strip())
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be a positive integer number of MiB, got {raw!r}") \
            from None
    if mb <= 0:
        raise ValueError(f"{ENV_VAR} must be a positive integer number of MiB, got {raw!r}")
    return mb << 20


def image_slices(n: int, bytes_per_image: int, budget: int | None = None) -> list[tuple[int, int]]:
    """``[(n0, n1), ...]``: the batch ``range(n)`` cut into slices of whole images, as few as
    keep each slice's workspace (``(n1 - n0) * bytes_per_image``) within ``budget`` bytes
    (default :func:`workspace_budget`), at least one image per slice even when one image alone
    exceeds the budget, and at most :data:`MAX_IMAGES_PER_SLICE`; sizes balanced (differing by
    at most one, larger first): n=10 with room for 4 gives 4, 3, 3."""
    if n < 1:
        raise ValueError(f"image_slices: the batch must have at least one image, got n={n}")
    if bytes_per_image < 0:
        raise ValueError(f"image_slices: bytes_per_image must be >= 0, got {bytes_per_image}")
    if budget is None:
        budget = workspace_budget()
    elif budget <= 0:
        raise ValueError(f"image_slices: budget must be positive, got {budget}")
    # Under torch.compile with dynamic shapes n and bytes_per_image may be SymInts: sym_min,
    # sym_max and integer arithmetic keep them symbolic, and only the slice count becomes a
    # plain int (a guard on the sizes giving the same count), never the slice sizes.
    per = n if bytes_per_image == 0 else torch.sym_min(n, budget // bytes_per_image)
    per = torch.sym_max(1, torch.sym_min(per, MAX_IMAGES_PER_SLICE))
    count = -(-n // per)
    base, extra = n // count, n % count  # the first `extra` slices take base + 1 images
    starts = [i * base + torch.sym_min(i, extra) for i in range(count)] + [n]
    return list(zip(starts[:-1], starts[1:]))


def rows(t, n0: int, n1: int):
    """``t[n0:n1]`` along dim 0, or ``t`` itself when that is all of it: a one-slice call then
    traces the same graph as an unsliced launcher, with no view for ``torch.compile``'s
    functionalization to copy around a kernel that writes it."""
    whole = statically_known_true(n0 == 0) and statically_known_true(n1 == t.shape[0])
    return t if whole else t[n0:n1]
