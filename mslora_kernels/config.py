"""The static description of one MSLoRA module: sizes, options and layout, validated once.

Every backend receives the same frozen :class:`MSLoRAOptions`, so a configuration is checked in
exactly one place (here) and never inside a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DATA_FORMATS = ("channels_first", "channels_last")
BACKENDS = ("auto", "reference", "triton", "cuda")


@dataclass(frozen=True)
class MSLoRAOptions:
    """Hyper-parameters of one MSLoRA module (SPEC section 1)."""

    channels: int
    rank: int = 128
    groups: int = 4
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    prenorm: bool = False
    enhance: bool = False
    pool: bool = False
    gate: bool = False
    shuffle: bool = False
    data_format: str = "channels_first"

    def __post_init__(self) -> None:
        # Normalise the kernel sizes to a tuple of ints so that the options are hashable.
        object.__setattr__(self, "kernel_sizes", tuple(int(k) for k in self.kernel_sizes))
        validate_options(self)

    @property
    def max_kernel_size(self) -> int:
        return max(self.kernel_sizes)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"MSLoRA: {name} must be a positive integer, got {value!r}")


def validate_options(o: MSLoRAOptions) -> None:
    """Raise ``ValueError`` naming the problem for any configuration SPEC does not allow."""
    _positive_int("channels", o.channels)
    _positive_int("rank", o.rank)
    _positive_int("groups", o.groups)
    if o.channels % o.groups != 0:
        raise ValueError(
            f"MSLoRA: channels ({o.channels}) must be divisible by groups ({o.groups}): "
            f"C % G = {o.channels % o.groups}"
        )
    if o.rank % o.groups != 0:
        raise ValueError(
            f"MSLoRA: rank ({o.rank}) must be divisible by groups ({o.groups}): "
            f"D % G = {o.rank % o.groups}"
        )
    if len(o.kernel_sizes) == 0:
        raise ValueError("MSLoRA: kernel_sizes must name at least one kernel size")
    for k in o.kernel_sizes:
        if k <= 0:
            raise ValueError(f"MSLoRA: kernel size {k} must be positive")
        if k % 2 == 0:
            raise ValueError(
                f"MSLoRA: kernel size {k} is even; kernel sizes must be odd ('same' padding k//2)"
            )
    if o.data_format not in DATA_FORMATS:
        raise ValueError(
            f"MSLoRA: unknown data_format {o.data_format!r}; expected one of {DATA_FORMATS}"
        )


def validate_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"MSLoRA: unknown backend {backend!r}; expected one of {BACKENDS}")


def weight_shapes(o: MSLoRAOptions) -> dict[str, tuple[int, ...]]:
    """SPEC's parameter table for these options: checkpoint name -> shape, in the fused ops' order
    (proj, down, dw.i, pw, up, then norm, enorm and gate when their option is on)."""
    c, d, g, nk = o.channels, o.rank, o.groups, len(o.kernel_sizes)
    s = {"proj.weight": (d, c // g, 1, 1), "down.weight": (d, c // g, 1, 1)}
    s.update({f"dw.{i}.weight": (d, 1, k, k) for i, k in enumerate(o.kernel_sizes)})
    s.update({"pw.weight": (d, d, 1, 1), "up.weight": (c, d // g, 1, 1)})
    if o.prenorm:
        s.update({"norm.weight": (c,), "norm.bias": (c,)})
    if o.enhance:
        s.update({"enorm.weight": (d,), "enorm.bias": (d,)})
    if o.gate:
        s.update({"gate.weight": (nk, d, 1, 1), "gate.bias": (nk,)})
    return s


def flat_grad_sections(o: MSLoRAOptions) -> dict[str, int]:
    """The weight gradients as the fused backwards lay out their sections: name -> elements, in
    :func:`weight_shapes` order, with every path's taps one run ``"dw"`` (D * sum k^2 elements,
    in dw.0's place)."""
    out = {}
    for name, shape in weight_shapes(o).items():
        key = "dw" if name.startswith("dw.") else name
        out[key] = out.get(key, 0) + math.prod(shape)
    return out


def split_flat_grads(flat: torch.Tensor, o: MSLoRAOptions) -> dict[str, torch.Tensor]:
    """The fused backwards' flat weight gradients (every one flattened, in :func:`weight_shapes`
    order) as a dict of views in the weights' shapes."""
    shapes = weight_shapes(o)
    parts = flat.split([math.prod(sh) for sh in shapes.values()])
    return {name: p.view(sh) for (name, sh), p in zip(shapes.items(), parts, strict=True)}


def mslora_param_count(channels: int, rank: int = 128, groups: int = 4,
                       kernel_sizes=(3, 5, 7)) -> int:
    """Trainable parameters of one MSLoRA module without options (the paper's Eq. 3).

    ``3*C*D/G + D*D + sum(k*k)*D``: proj, down and up (grouped), pw (dense) and the depthwise taps.
    """
    o = MSLoRAOptions(channels, rank, groups, tuple(kernel_sizes))
    c, d, g = o.channels, o.rank, o.groups
    return 3 * c * d // g + d * d + sum(k * k for k in o.kernel_sizes) * d
