"""The reference against SPEC section 1: gradcheck, an independent formulation, both layouts."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mslora_kernels import MSLoRA, reference
from mslora_kernels.config import MSLoRAOptions
from mslora_kernels.testing import rel_error

OPTION_NAMES = ("prenorm", "enhance", "pool", "gate", "shuffle")


def randomize_(module: nn.Module) -> nn.Module:
    """Random, non-zero values for every parameter (``up`` included, LN weights near 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    return module


class IndependentMSLoRA(nn.Module):
    """SPEC section 1 written again from nn.Conv2d / nn.LayerNorm modules, channels-last inside.

    Shares no code with the package: it is the second formulation the reference is checked
    against. The channel shuffle is an explicit index permutation here.
    """

    def __init__(self, c, d, g, ks, prenorm, enhance, pool, gate, shuffle):
        super().__init__()
        self.g, self.ks = g, ks
        self.prenorm, self.enhance, self.pool, self.gate_on, self.shuffle = (
            prenorm, enhance, pool, gate, shuffle)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.proj = nn.Conv2d(c, d, 1, groups=g, bias=False)
        self.down = nn.Conv2d(c, d, 1, groups=g, bias=False)
        self.dws = nn.ModuleList(nn.Conv2d(d, d, k, padding=k // 2, groups=d, bias=False)
                                 for k in ks)
        self.gates = nn.ModuleList(nn.Conv2d(d, 1, 1) for _ in ks)
        self.enorm = nn.LayerNorm(d, eps=1e-6)
        self.pw = nn.Conv2d(d, d, 1, bias=False)
        self.up = nn.Conv2d(d, c, 1, groups=g, bias=False)

    def load_from(self, sd):
        with torch.no_grad():
            for name in ("proj", "down", "pw", "up"):
                getattr(self, name).weight.copy_(sd[f"{name}.weight"])
            for i, conv in enumerate(self.dws):
                conv.weight.copy_(sd[f"dw.{i}.weight"])
            if self.prenorm:
                self.norm.weight.copy_(sd["norm.weight"])
                self.norm.bias.copy_(sd["norm.bias"])
            if self.enhance:
                self.enorm.weight.copy_(sd["enorm.weight"])
                self.enorm.bias.copy_(sd["enorm.bias"])
            if self.gate_on:
                for i, conv in enumerate(self.gates):
                    conv.weight.copy_(sd["gate.weight"][i : i + 1])
                    conv.bias.copy_(sd["gate.bias"][i : i + 1])

    def forward(self, x):  # x: (N, C, H, W)
        to_last = lambda t: t.permute(0, 2, 3, 1)
        to_first = lambda t: t.permute(0, 3, 1, 2)
        u = to_first(self.norm(to_last(x))) if self.prenorm else x
        a, z = self.proj(u), self.down(u)
        paths = []
        for conv, gate in zip(self.dws, self.gates):
            c = conv(z)
            p = 0.5 * c * (1 + torch.erf(c / 2 ** 0.5))
            if self.gate_on:
                p = p / (1 + torch.exp(-gate(z)))
            paths.append(p)
        s = torch.stack(paths).sum(0)
        if self.pool:
            mz = z.sum(dim=(2, 3), keepdim=True) / (z.shape[2] * z.shape[3])
            s = s + F.gelu(mz)
        if self.enhance:
            s = F.gelu(to_first(self.enorm(to_last(s))))
        m = a * self.pw(s)
        if self.shuffle:
            d = m.shape[1]
            per = d // self.g
            # output channel j*G + i takes input channel i*per + j
            idx = torch.tensor([i * per + j for j in range(per) for i in range(self.g)])
            m = m[:, idx]
        return x + self.up(m)


CASES = [dict(zip(OPTION_NAMES, flags)) for flags in itertools.product([False, True], repeat=5)]


def case_id(opts):
    return "+".join(k for k, v in opts.items() if v) or "plain"


@pytest.mark.parametrize("opts", CASES, ids=case_id)
def test_matches_independent_formulation(opts):
    c, d, g, ks = 40, 24, 4, (3, 5, 7)
    m = randomize_(MSLoRA(c, d, g, ks, **opts, backend="reference")).double()
    ind = IndependentMSLoRA(c, d, g, ks, **opts).double()
    ind.load_from(m.state_dict())
    x = torch.randn(2, c, 13, 9, dtype=torch.float64)
    assert rel_error(m(x), ind(x)) < 1e-12
    # And the adapter is not the identity: H(x) is a real contribution.
    assert rel_error(m(x), x) > 1e-3


@pytest.mark.parametrize("opts", [CASES[0], CASES[-1]], ids=["plain", "all"])
def test_layouts_give_the_same_function(opts):
    c = 12
    first = randomize_(MSLoRA(c, 20, 2, (1, 3), **opts)).double()
    last = MSLoRA(c, 20, 2, (1, 3), **opts, data_format="channels_last").double()
    last.load_state_dict(first.state_dict())
    x = torch.randn(3, c, 7, 10, dtype=torch.float64)
    ref = first(x)
    assert rel_error(last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), ref) < 1e-14
    # channels_first in torch.channels_last memory format is the same function too
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert rel_error(first(x_cl), ref) < 1e-14


def test_gradcheck_every_option_on():
    o = MSLoRAOptions(8, rank=8, groups=2, kernel_sizes=(1, 3), prenorm=True, enhance=True,
                      pool=True, gate=True, shuffle=True)
    m = randomize_(MSLoRA(8, 8, 2, (1, 3), prenorm=True, enhance=True, pool=True, gate=True,
                          shuffle=True)).double()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in m.named_parameters()]
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return reference.mslora(x, dict(zip(names, ps)), o)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_gradcheck_layouts(data_format):
    o = MSLoRAOptions(6, rank=4, groups=2, kernel_sizes=(3,), gate=True,
                      data_format=data_format)
    m = randomize_(MSLoRA(6, 4, 2, (3,), gate=True, data_format=data_format)).double()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in m.named_parameters()]
    shape = (1, 6, 5, 3) if data_format == "channels_first" else (1, 5, 3, 6)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: reference.mslora(x, dict(zip(names, ps)), o),
                                    (x, *params))


def test_rank_may_exceed_channels_and_sizes_are_odd():
    m = randomize_(MSLoRA(6, 30, 3, (3, 5)))
    x = torch.randn(1, 6, 1, 17)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
