"""The pure-PyTorch MSLoRA: the source of truth that every test and benchmark compares against.

It follows SPEC section 1 line by line, in plain differentiable PyTorch, for any N, H, W, any C
and D (no power-of-two assumption) and every option. It reads the weights from a mapping whose
keys are the checkpoint names (``proj.weight``, ``dw.0.weight``, ...), so it works equally on a
module's parameters and on a loaded state dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .config import MSLoRAOptions

LN_EPS = 1e-6


def _layer_norm_channels(x: torch.Tensor, weight, bias) -> torch.Tensor:
    """LayerNorm over dim 1 of an (N, ch, H, W) tensor, eps 1e-6."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, LN_EPS)
    return y.permute(0, 3, 1, 2)


def channel_shuffle(m: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, G, D/G, H, W) -> transpose(1, 2) -> (N, D, H, W)."""
    n, d, h, w = m.shape
    return m.reshape(n, groups, d // groups, h, w).transpose(1, 2).reshape(n, d, h, w)


def mslora_core(x: torch.Tensor, weights: Mapping[str, torch.Tensor],
                o: MSLoRAOptions) -> torch.Tensor:
    """H(x) for a channels-first (N, C, H, W) x; returns y (N, C, H, W) without the residual."""
    g = o.groups
    u = _layer_norm_channels(x, weights["norm.weight"], weights["norm.bias"]) if o.prenorm else x
    a = F.conv2d(u, weights["proj.weight"], groups=g)  # linear branch
    z = F.conv2d(u, weights["down.weight"], groups=g)  # input of the nonlinear branch
    d = z.shape[1]
    s = None
    for i, k in enumerate(o.kernel_sizes):
        c = F.conv2d(z, weights[f"dw.{i}.weight"], padding=k // 2, groups=d)
        p = F.gelu(c)
        if o.gate:
            gi = F.conv2d(z, weights["gate.weight"][i : i + 1], weights["gate.bias"][i : i + 1])
            p = p * torch.sigmoid(gi)
        s = p if s is None else s + p
    if o.pool:
        s = s + F.gelu(z.mean(dim=(2, 3), keepdim=True))
    if o.enhance:
        s = F.gelu(_layer_norm_channels(s, weights["enorm.weight"], weights["enorm.bias"]))
    t = F.conv2d(s, weights["pw.weight"])
    m = a * t  # the attention reweighting
    if o.shuffle:
        m = channel_shuffle(m, g)
    return F.conv2d(m, weights["up.weight"], groups=g)


def mslora(x: torch.Tensor, weights: Mapping[str, torch.Tensor], o: MSLoRAOptions) -> torch.Tensor:
    """``x + H(x)`` in the layout ``o.data_format`` names (SPEC section 1).

    ``x`` is (N, C, H, W) for ``channels_first`` (any memory format) or (N, H, W, C) for
    ``channels_last``. The residual uses the raw x, also under ``prenorm``.
    """
    if o.data_format == "channels_last":
        y = mslora_core(x.permute(0, 3, 1, 2), weights, o).permute(0, 2, 3, 1)
    else:
        y = mslora_core(x, weights, o)
    return x + y
