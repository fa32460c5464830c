"""MSLoRA as an ``nn.Module``: parameters named and initialised exactly as SPEC's table.

``forward(x)`` returns ``x + H(x)``. The module only validates, picks the backend and the compute
dtype; the arithmetic lives in :mod:`mslora_kernels.reference` or in the fused ops.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops, reference
from .backends import in_func_transform, resolve_backend
from .config import MSLoRAOptions, validate_backend


class _Gate(nn.Module):
    """One 1x1 conv D -> 1 per multi-scale path.

    ``weight`` is (len(K), D, 1, 1) and ``bias`` (len(K),), as SPEC's checkpoint table says.
    """

    def __init__(self, paths: int, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(paths, rank, 1, 1))
        self.bias = nn.Parameter(torch.empty(paths))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default, per path: kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(D), 1/sqrt(D)),
        # and so is the bias.
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)


def _conv1x1(c_in: int, c_out: int, groups: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, groups=groups, bias=False)


def check_input(x: torch.Tensor, o: MSLoRAOptions, param: torch.Tensor) -> None:
    """Refuse, with a message naming the problem, any input SPEC does not define."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"MSLoRA: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"MSLoRA: input must be a floating-point tensor, got dtype {x.dtype}")
    layout = "(N, C, H, W)" if o.data_format == "channels_first" else "(N, H, W, C)"
    if x.dim() != 4:
        raise ValueError(
            f"MSLoRA: input must be 4-D {layout} for data_format={o.data_format!r}, "
            f"got {x.dim()}-D shape {tuple(x.shape)}"
        )
    c = x.shape[1] if o.data_format == "channels_first" else x.shape[3]
    if c != o.channels:
        raise ValueError(
            f"MSLoRA: input has {c} channels in the {layout} layout of "
            f"data_format={o.data_format!r}, but the module was built for {o.channels} channels "
            f"(input shape {tuple(x.shape)})"
        )
    h, w = x.shape[2:] if o.data_format == "channels_first" else x.shape[1:3]
    if h == 0 or w == 0:  # an empty batch (N = 0) is fine; an empty map has no H(x)
        raise ValueError(
            f"MSLoRA: input has an empty feature map (H={h}, W={w}) in the {layout} layout of "
            f"data_format={o.data_format!r}, shape {tuple(x.shape)}"
        )
    if x.device != param.device:
        raise ValueError(
            f"MSLoRA: input is on {x.device} but the module's parameters are on {param.device}"
        )


class MSLoRA(nn.Module):
    """Multi-scale low-rank attention reweighting: ``out = x + H(x)`` (SPEC section 1).

    Args:
        channels: C, the feature map's channels.
        rank: D, the adapter's width. May exceed C; must be divisible by ``groups``.
        groups: G, the groups of the proj/down/up 1x1 convolutions.
        kernel_sizes: K, odd depthwise kernel sizes, one multi-scale path each.
        prenorm, enhance, pool, gate, shuffle: SPEC's options, all off by default.
        data_format: ``"channels_first"`` for (N, C, H, W) input (any memory format) or
            ``"channels_last"`` for (N, H, W, C).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``. ``"auto"`` picks the
            fastest backend usable on the input's device (the reference on a CPU). A backend named
            explicitly that cannot run raises an error naming what is missing.
        deterministic: fused backends only. ``False`` (the default) lets the backward accumulate
            weight gradients with atomics (fastest; gradients may differ in the last bits from
            run to run). ``True`` makes the backward bitwise reproducible (fixed-order
            reductions). ``torch.use_deterministic_algorithms(True)`` also turns it on. The
            forward is deterministic either way.

    Compute dtype: under ``torch.autocast`` the module runs in the autocast dtype (input and
    weights cast to it, output in it); otherwise in the input's dtype, with the weights cast to
    it when they differ.
    """

    def __init__(self, channels: int, rank: int = 128, groups: int = 4,
                 kernel_sizes=(3, 5, 7), prenorm: bool = False, enhance: bool = False,
                 pool: bool = False, gate: bool = False, shuffle: bool = False,
                 data_format: str = "channels_first", backend: str = "auto",
                 deterministic: bool = False) -> None:
        super().__init__()
        self.options = MSLoRAOptions(channels, rank, groups, tuple(kernel_sizes), prenorm,
                                     enhance, pool, gate, shuffle, data_format)
        validate_backend(backend)
        self.backend = backend
        self.deterministic = bool(deterministic)
        c, d, g = channels, rank, groups
        self.proj = _conv1x1(c, d, g)
        self.down = _conv1x1(c, d, g)
        self.dw = nn.ModuleList(
            nn.Conv2d(d, d, k, padding=k // 2, groups=d, bias=False)
            for k in self.options.kernel_sizes
        )
        self.pw = _conv1x1(d, d, 1)
        self.up = _conv1x1(d, c, g)
        nn.init.zeros_(self.up.weight)  # a new adapter is the identity
        if prenorm:
            self.norm = nn.LayerNorm(c, eps=reference.LN_EPS)
        if enhance:
            self.enorm = nn.LayerNorm(d, eps=reference.LN_EPS)
        if gate:
            self.gate = _Gate(len(self.options.kernel_sizes), d)

    def extra_repr(self) -> str:
        o = self.options
        opts = [n for n in ("prenorm", "enhance", "pool", "gate", "shuffle") if getattr(o, n)]
        return (f"channels={o.channels}, rank={o.rank}, groups={o.groups}, "
                f"kernel_sizes={o.kernel_sizes}, options={opts}, data_format={o.data_format!r}, "
                f"backend={self.backend!r}"
                + (", deterministic=True" if self.deterministic else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.options, self.pw.weight)
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        weights = {n: (p if p.dtype == dtype else p.to(dtype)) for n, p in self.named_parameters()}
        x = x if x.dtype == dtype else x.to(dtype)
        o = self.options
        backend = resolve_backend(self.backend, x.device, x, o,
                                  in_func_transform(x, *weights.values()))
        with torch.autocast(x.device.type, enabled=False):
            # An empty batch launches no kernel: the reference gives its empty output and the
            # weights' zero gradients, as the fused backends would.
            if backend == "reference" or x.shape[0] == 0:
                return reference.mslora(x, weights, self.options)
            deterministic = self.deterministic or torch.are_deterministic_algorithms_enabled()
            return ops.mslora(x, weights, self.options, backend, deterministic)
