"""Serial LoRA and MSPLoRA: reference math, placement through ``inject``, merging, LoRA+, PEFT.

The models here mirror timm's and torchvision's module names (``blocks.{i}.attn.qkv``,
``layers.{s}.blocks.{i}.attn.qkv``, a ``ShiftedWindowAttention`` that reads ``qkv.weight``),
since timm and torchvision are not installed on the CPU machines; the real ones are tested at
the end with ``importorskip``. Expected values come from hooks that apply SPEC's equations to an
untouched copy of the model, never from the wrappers under test.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mslora_kernels import (
    MSPLoRAConfig,
    SerialLoRAConfig,
    loraplus_param_groups,
    merge,
    unmerge,
)
from mslora_kernels.inject import inject
from mslora_kernels.lora import (
    LoRAPair,
    MSPLoRALinear,
    SerialLoRALinear,
    layer_index,
    mid_groups,
    msplora_reference,
    serial_lora_reference,
    serial_merged_weight,
    serial_unmerged_weight,
)
from mslora_kernels.testing import rel_error

D, TOKENS, BATCH = 40, 37, 2


# ------------------------------------------------------------------ tiny models with timm names
class Attention(nn.Module):
    """timm's Attention: one fused qkv Linear called as a module, then proj."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, n, d))


class ShiftedWindowAttention(Attention):
    """torchvision's habit: the attention reads ``self.qkv.weight`` instead of calling qkv."""

    def forward(self, x):
        b, n, d = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        return F.linear(a.transpose(1, 2).reshape(b, n, d), self.proj.weight, self.proj.bias)


class SeparateQKV(nn.Module):
    """An attention with separate q, k, v, o projections (as in HF ViT / CLIP)."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.o(a @ self.v(x))


class Block(nn.Module):
    def __init__(self, d, attn_cls=Attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = attn_cls(d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, d=D, depth=3, attn_cls=Attention):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, attn_cls) for _ in range(depth))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Stage(nn.Module):
    def __init__(self, d, depth):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))


class TinySwin(nn.Module):
    """timm Swin's names: layers.{stage}.blocks.{i}.attn.qkv (widths equal unless given)."""

    def __init__(self, depths=(2, 2, 6, 2), widths=None):
        super().__init__()
        widths = widths or (D,) * len(depths)
        self.layers = nn.ModuleList(Stage(w, n) for w, n in zip(widths, depths, strict=True))
        self.downs = nn.ModuleList(nn.Linear(a, b)
                                   for a, b in zip(widths, widths[1:], strict=False))

    def forward(self, x):
        for i, st in enumerate(self.layers):
            for b in st.blocks:
                x = b(x)
            if i < len(self.downs):
                x = self.downs[i](x)
        return x


def _x(d=D, dtype=torch.float32):
    return torch.randn(BATCH, TOKENS, d, dtype=dtype)


def _randomize_b(model):
    """Make every adapter non-trivial (B starts at zeros)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAPair):
                m.B.normal_(0, 0.2)


def _adapter_params(model):
    return {id(p) for m in model.modules() if isinstance(m, LoRAPair) for p in m.parameters()}


def _adapted_linears(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, (SerialLoRALinear, MSPLoRALinear))]


def _check_only_adapters_train(model):
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == _adapter_params(model), "only the adapter pairs may be trainable"


# ------------------------------------------------------------------ direct references (hooks)
def serial_hooked(orig, adapted, attach="qkv"):
    """A copy of ``orig`` with SPEC 2's x~ = x + s (x A^T) B^T applied by pre-hooks, using the
    pairs the wrappers in ``adapted`` hold (same names)."""
    ref = copy.deepcopy(orig)
    mods = dict(ref.named_modules())
    for name, m in adapted.named_modules():
        if isinstance(m, SerialLoRALinear):
            a, b, s = m.pair.A, m.pair.B, m.scale
            target = name.rpartition(".")[0] if attach == "parent" else name
            hook = lambda mod, args, a=a, b=b, s=s: (args[0] + s * (args[0] @ a.T) @ b.T,)
            mods[target].register_forward_pre_hook(hook)
    return ref


def msp_hooked(orig, adapted):
    """A copy of ``orig`` with SPEC 3's sum over levels added to each targeted output."""
    ref = copy.deepcopy(orig)
    mods = dict(ref.named_modules())
    for name, m in adapted.named_modules():
        if isinstance(m, MSPLoRALinear):
            pairs = [(p.A, p.B) for p in m.pairs()]

            def hook(mod, args, out, pairs=pairs, scales=tuple(m.scales)):
                x = args[0]
                return out + sum(s * (x @ a.T) @ b.T
                                 for (a, b), s in zip(pairs, scales, strict=True))
            mods[name].register_forward_hook(hook)
    return ref


def _compare(model, ref, x, tol=1e-10):
    """Outputs, input gradient and every adapter gradient of ``model`` vs ``ref``, in float64
    (the hooks hold the same Parameter objects, converted in place)."""
    model.double()
    ref.double()
    x = x.double()
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yr = model(xa), ref(xr)
    assert rel_error(ya, yr) < tol
    g = torch.randn_like(ya)
    params = [p for m in model.modules() if isinstance(m, LoRAPair) for p in m.parameters()]
    ga = torch.autograd.grad(ya, [xa] + params, g)
    gr = torch.autograd.grad(yr, [xr] + params, g)
    for i, (u, v) in enumerate(zip(ga, gr, strict=True)):
        assert v.abs().sum() > 0, f"gradient {i} of the reference is zero: test is vacuous"
        assert rel_error(u, v) < tol, f"gradient {i}: {rel_error(u, v):.2e}"


# ------------------------------------------------------------------ reference math
def test_serial_reference_is_spec_equation_per_projection():
    x = torch.randn(5, 7, D, dtype=torch.float64)
    w, bias = torch.randn(3 * D, D, dtype=torch.float64), torch.randn(3 * D, dtype=torch.float64)
    a, b = torch.randn(3, D, dtype=torch.float64), torch.randn(D, 3, dtype=torch.float64)
    y = serial_lora_reference(x, w, bias, a, b, 0.7)
    xt = x + 0.7 * (x @ a.T) @ b.T
    for i in range(3):  # q, k, v each from the same transformed input
        sl = slice(i * D, (i + 1) * D)
        assert torch.allclose(y[..., sl], xt @ w[sl].T + bias[sl])
    # ... and the merged weight W (I + s B A) gives the same projection
    wm = serial_merged_weight(w, a, b, 0.7)
    assert torch.allclose(wm, w @ (torch.eye(D, dtype=torch.float64) + 0.7 * b @ a))
    assert torch.allclose(x @ wm.T + bias, y)
    assert torch.allclose(serial_unmerged_weight(wm, a, b, 0.7), w)


def test_references_pass_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: serial_lora_reference(*t, 0.5), (x, w, bias, a, b))
    a2 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    b3 = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, bias, a, b, a2, b2: msplora_reference(x, w, bias, [(a, b), (a2, b2)],
                                                           [0.5, 2.0]),
        (x, w, bias, a, b3, a2, b2))


# ------------------------------------------------------------------ Serial LoRA placement
def test_serial_inject_timm_vit_names_matches_spec_and_freezes():
    orig = TinyViT()
    model = copy.deepcopy(orig)
    cfg = SerialLoRAConfig(rank=3, alpha=5, backend="reference")
    inject(model, cfg)
    names = _adapted_linears(model)
    assert names == [f"blocks.{i}.attn.qkv" for i in range(3)]
    _check_only_adapters_train(model)
    _randomize_b(model)
    _compare(model, serial_hooked(orig, model), _x())


def test_serial_new_adapter_is_identity():
    orig = TinyViT()
    model = inject(copy.deepcopy(orig), SerialLoRAConfig(rank=3, backend="reference"))
    x = _x()
    assert torch.equal(model(x), orig(x))


def test_serial_inject_timm_swin_names():
    orig = TinySwin(depths=(1, 2), widths=(D, 24))
    model = inject(copy.deepcopy(orig), SerialLoRAConfig(rank=3, backend="reference"))
    names = _adapted_linears(model)
    assert names == ["layers.0.blocks.0.attn.qkv", "layers.1.blocks.0.attn.qkv",
                     "layers.1.blocks.1.attn.qkv"]
    assert model.layers[1].blocks[0].attn.qkv.pair.A.shape == (3, 24)
    _check_only_adapters_train(model)
    _randomize_b(model)
    _compare(model, serial_hooked(orig, model), _x())


def test_serial_torchvision_style_attention_reads_adapted_weight():
    """torchvision's ShiftedWindowAttention calls F.linear(x, qkv.weight): the wrapper's effective
    weight carries the adapter, equal to transforming the attention's input."""
    orig = TinyViT(depth=2, attn_cls=ShiftedWindowAttention)
    model = inject(copy.deepcopy(orig), SerialLoRAConfig(rank=3, alpha=4, backend="reference"))
    _randomize_b(model)
    _compare(model, serial_hooked(orig, model, attach="parent"), _x())


def test_serial_separate_qkv_share_one_pair_quarter_of_lora():
    model = TinyViT(depth=2, attn_cls=SeparateQKV)
    r = 4
    adapted = SerialLoRAConfig(rank=r, targets=["q", "k", "v"], backend="reference")._inject(model)
    assert adapted == [f"blocks.{i}.attn.{p}" for i in range(2) for p in "qkv"]
    attn = model.blocks[0].attn
    assert attn.q.pair is attn.k.pair is attn.v.pair
    assert attn.q.pair is not model.blocks[1].attn.q.pair
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train == 2 * (2 * D * r)  # 2dr per block
    lora_qkvo = 4 * (D * r + r * D)  # LoRA on q, k, v, o: 8dr per block
    assert n_train * 4 == 2 * lora_qkvo
    # a shared pair sits once in the checkpoint
    keys = [k for k in model.state_dict() if "serial_lora" in k]
    assert keys == [f"blocks.{i}.attn.q.serial_lora.{p}" for i in range(2) for p in "AB"]


def test_serial_merge_unmerge_round_trip():
    orig = TinyViT()
    model = inject(copy.deepcopy(orig), SerialLoRAConfig(rank=3, alpha=6, backend="reference"))
    _randomize_b(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base.weight" in n}
    x = _x()
    y = model(x)
    merge(model)
    qkv = model.blocks[1].attn.qkv
    expect = serial_merged_weight(w0["blocks.1.attn.qkv.base.weight"].double(),
                                  qkv.pair.A.double(), qkv.pair.B.double(), qkv.scale)
    assert rel_error(qkv.base.weight, expect) < 1e-6
    assert rel_error(model(x), y) < 1e-5
    assert torch.equal(qkv.weight, qkv.base.weight)  # merged: the effective weight is the base
    unmerge(model)
    for n, p in model.named_parameters():
        if n in w0:
            assert rel_error(p, w0[n]) < 1e-6
    assert rel_error(model(x), y) < 1e-5


def test_serial_autocast_bf16_reference():
    model = inject(TinyViT(depth=1), SerialLoRAConfig(rank=3, backend="reference"))
    _randomize_b(model)
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.blocks[0].attn.qkv(x)
    assert y.dtype == torch.bfloat16
    assert rel_error(y, model.blocks[0].attn.qkv(x)) < 3e-2


# ------------------------------------------------------------------ MSPLoRA placement
def test_mid_groups_contiguous_near_equal():
    for n_layers, n_mid in [(12, 3), (7, 3), (2, 3), (24, 5), (1, 1)]:
        g = mid_groups(n_layers, n_mid)
        assert len(g) == n_layers and g == sorted(g)
        sizes = [g.count(i) for i in range(max(g) + 1)]
        assert len(sizes) == min(n_mid, n_layers) and max(sizes) - min(sizes) <= 1


def test_layer_index_is_numeric_over_all_indices():
    names = ["layers.1.blocks.0.attn.qkv", "layers.0.blocks.10.attn.qkv",
             "layers.0.blocks.2.attn.qkv"]
    assert sorted(names, key=layer_index) == [names[2], names[1], names[0]]


def test_msplora_inject_vit_sharing_and_spec():
    orig = TinyViT(depth=7)
    model = copy.deepcopy(orig)
    inject(model, MSPLoRAConfig(ranks=(4, 3, 2), alpha=6, n_mid=3, backend="reference"))
    _check_only_adapters_train(model)
    q = [model.blocks[i].attn.qkv for i in range(7)]
    assert all(isinstance(m, MSPLoRALinear) for m in q)
    glob = {id(m.pairs()[0]) for m in q}
    mids = [id(m.pairs()[1]) for m in q]
    layers = {id(m.pairs()[2]) for m in q}
    assert len(glob) == 1 and len(layers) == 7
    assert [mids.index(i) for i in mids] == [0, 0, 0, 3, 3, 5, 5]  # groups 3, 2, 2
    assert q[0].scales == [1.5, 2.0, 3.0]
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per = D + 3 * D  # in + out features of qkv per unit of rank
    assert n == per * (4 + 3 * 3 + 7 * 2)
    _randomize_b(model)
    _compare(model, msp_hooked(orig, model), _x())


def test_msplora_swin_groups_by_stage_then_block():
    """Mid groups follow (stage, block) order over all stages of equal width, not the stage."""
    model = TinySwin(depths=(2, 2, 6, 2))
    MSPLoRAConfig(n_mid=3, backend="reference")._inject(model)
    order = [(s, i) for s, n in enumerate((2, 2, 6, 2)) for i in range(n)]
    mods = [model.layers[s].blocks[i].attn.qkv for s, i in order]
    mids = [id(m.pairs()[1]) for m in mods]
    groups = [sorted(set(mids), key=mids.index).index(i) for i in mids]
    assert groups == [0] * 4 + [1] * 4 + [2] * 4
    assert len({id(m.pairs()[0]) for m in mods}) == 1


def test_msplora_swin_stages_of_different_width_are_separate_types():
    orig = TinySwin(depths=(3, 2), widths=(D, 24))
    model = copy.deepcopy(orig)
    MSPLoRAConfig(ranks=(3, 2, 1), n_mid=2, backend="reference")._inject(model)
    s0 = [model.layers[0].blocks[i].attn.qkv for i in range(3)]
    s1 = [model.layers[1].blocks[i].attn.qkv for i in range(2)]
    assert s0[0].pairs()[0] is s0[2].pairs()[0] and s0[0].pairs()[0] is not s1[0].pairs()[0]
    assert s1[0].pairs()[0].A.shape == (3, 24)
    _randomize_b(model)
    _compare(model, msp_hooked(orig, model), _x())


def test_msplora_merge_unmerge_and_torchvision_style():
    orig = TinyViT(depth=4, attn_cls=ShiftedWindowAttention)
    model = inject(copy.deepcopy(orig), MSPLoRAConfig(n_mid=2, backend="reference"))
    _randomize_b(model)
    x = _x()
    y = model(x)
    ref = copy.deepcopy(orig)  # the effective weights, by SPEC 3's merged form
    for i in range(4):
        m = model.blocks[i].attn.qkv
        delta = sum(s * p.B @ p.A for p, s in zip(m.pairs(), m.scales, strict=True))
        with torch.no_grad():
            ref.blocks[i].attn.qkv.weight += delta
    assert rel_error(y, ref(x)) < 1e-5
    merge(model)
    assert rel_error(model(x), y) < 1e-5
    unmerge(model)
    assert rel_error(model(x), y) < 1e-5
    assert rel_error(model.blocks[0].attn.qkv.base.weight, orig.blocks[0].attn.qkv.weight) < 1e-6


# ------------------------------------------------------------------ LoRA+, validation
def test_loraplus_param_groups():
    model = inject(TinyViT(depth=3), MSPLoRAConfig(n_mid=2, backend="reference"))
    model.head.requires_grad_(True)
    groups = loraplus_param_groups(model, lr=1e-3, ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    b_ids = {id(m.B) for m in model.modules() if isinstance(m, LoRAPair)}
    assert {id(p) for p in groups[1]["params"]} == b_ids
    assert {id(p) for p in model.head.parameters()} <= {id(p) for p in groups[0]["params"]}
    n_all = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_all  # shared pairs once
    torch.optim.AdamW(groups)
    with pytest.raises(ValueError, match="ratio"):
        loraplus_param_groups(model, lr=1e-3, ratio=0)
    with pytest.raises(ValueError, match="no LoRA pairs"):
        loraplus_param_groups(TinyViT(), lr=1e-3)


@pytest.mark.parametrize("kwargs, exc, text", [
    ({"rank": 0}, ValueError, "rank"),
    ({"alpha": -1}, ValueError, "alpha"),
    ({"backend": "cuda"}, ValueError, "backend"),
    ({"targets": 3}, TypeError, "targets"),
])
def test_serial_config_validation(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        SerialLoRAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, text", [
    ({"ranks": (8, 4)}, "three"), ({"ranks": (0, 0, 0)}, "positive"),
    ({"ranks": (8, -1, 2)}, "mid rank"), ({"n_mid": 0}, "n_mid"),
])
def test_msplora_config_validation(kwargs, text):
    with pytest.raises(ValueError, match=text):
        MSPLoRAConfig(**kwargs)


def test_inject_with_nothing_to_adapt_and_bad_input():
    with pytest.raises(ValueError, match="nothing to adapt"):
        inject(TinyViT(), SerialLoRAConfig(targets=["nope"]))
    model = inject(TinyViT(depth=1), SerialLoRAConfig(backend="reference"))
    with pytest.raises(ValueError, match="in_features"):
        model.blocks[0].attn.qkv(torch.randn(2, D + 1))
    with pytest.raises(TypeError, match="floating"):
        model.blocks[0].attn.qkv(torch.ones(2, D, dtype=torch.long))
    # already adapted Linears are not adapted twice
    assert SerialLoRAConfig(targets=r".*qkv.*", backend="reference")._inject(model) == []


# ------------------------------------------------------------------ against PEFT
def _peft_model(model, targets, r):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)  # scaling lora_alpha / r = 1


def test_serial_equals_peft_lora_with_b_times_w():
    """Serial LoRA == LoRA with A_q = A, B_q = s W_q B (likewise k, v), on separate q, k, v."""
    orig = TinyViT(depth=2, attn_cls=SeparateQKV)
    r = 3
    model = inject(copy.deepcopy(orig), SerialLoRAConfig(rank=r, alpha=5, targets=["q", "k", "v"],
                                                         backend="reference"))
    _randomize_b(model)
    pm = _peft_model(copy.deepcopy(orig), ["q", "k", "v"], r)
    with torch.no_grad():
        for i in range(2):
            for p in "qkv":
                ours = getattr(model.blocks[i].attn, p)
                theirs = getattr(pm.base_model.model.blocks[i].attn, p)
                theirs.lora_A["default"].weight.copy_(ours.pair.A)
                theirs.lora_B["default"].weight.copy_(ours.scale * ours.base.weight @ ours.pair.B)
    x = _x()
    assert rel_error(model(x), pm(x)) < 1e-5


def test_msplora_equals_peft_lora_with_concatenated_rank():
    orig = TinyViT(depth=5)
    model = inject(copy.deepcopy(orig), MSPLoRAConfig(ranks=(4, 3, 2), alpha=6, n_mid=2,
                                                      backend="reference"))
    _randomize_b(model)
    pm = _peft_model(copy.deepcopy(orig), ["qkv"], 9)
    with torch.no_grad():
        for i in range(5):
            ours = model.blocks[i].attn.qkv
            theirs = pm.base_model.model.blocks[i].attn.qkv
            theirs.lora_A["default"].weight.copy_(torch.cat([p.A for p in ours.pairs()]))
            theirs.lora_B["default"].weight.copy_(
                torch.cat([s * p.B for p, s in zip(ours.pairs(), ours.scales, strict=True)],
                          dim=1))
    x = _x()
    assert rel_error(model(x), pm(x)) < 1e-5


# ------------------------------------------------------------------ real timm / torchvision
def test_timm_vit_and_swin_serial_and_msplora():
    timm = pytest.importorskip("timm")
    for arch in ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"):
        for cfg in (SerialLoRAConfig(backend="reference"), MSPLoRAConfig(backend="reference")):
            model = timm.create_model(arch, pretrained=False, num_classes=3).eval()
            inject(model, cfg)
            assert len(_adapted_linears(model)) == 12  # 12 blocks in both
            _check_only_adapters_train(model)
            _randomize_b(model)
            y = model(torch.randn(1, 3, 224, 224))
            y.sum().backward()
            assert all(p.grad is not None for m in model.modules() if isinstance(m, LoRAPair)
                       for p in m.parameters())


def test_torchvision_swin_serial_merge_round_trip():
    tvm = pytest.importorskip("torchvision.models")
    model = tvm.swin_t(num_classes=3).eval()
    names = _adapted_linears(inject(model, SerialLoRAConfig(backend="reference")))
    assert len(names) == 12 and all(n.endswith("attn.qkv") for n in names)
    _randomize_b(model)
    x = torch.randn(1, 3, 224, 224)
    y = model(x)
    y0 = copy.deepcopy(model)
    for m in y0.modules():
        if isinstance(m, LoRAPair):
            with torch.no_grad():
                m.B.zero_()
    assert rel_error(y0(x), y) > 1e-4  # the adapter reached the output
    merge(model)
    assert rel_error(model(x), y) < 1e-4


# ------------------------------------------------------------------ the benchmark's smoke mode
@pytest.mark.slow
def test_bench_lora_tiny_cpu(tmp_path):
    """The runner's CPU smoke mode (fused rows run under the interpreter set by conftest)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_lora.py"), "--device",
                        "cpu", "--tiny", "--reps", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True,
                       cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    rows = json.loads((tmp_path / files[0]).read_text())["rows"]
    providers = {row["provider"] for row in rows}
    assert {"eager-serial", "eager-msplora"} <= providers
    for row in rows:
        stamp = {"device", "torch", "triton", "cuda", "peft", "commit", "date"}
        assert stamp | {"shape"} <= row.keys()
        assert (row.get("error") is not None) or row["fwd_bwd_ms"]["median"] > 0
    # the fused rows ran (interpreted) and matched their eager twins to fp32's bound
    fused = [row for row in rows if row["provider"].startswith("fused")]
    assert len(fused) == 4 and all(row["error"] is None for row in fused), fused
    assert all(row["update_rel_err_vs_eager"] <= 1e-3 for row in fused)
    peft = rows[0]["peft"]  # the version the peft-lora rows ran with (the test extra has PEFT)
    assert peft != "not installed" and f"| PEFT {peft} |" in (tmp_path / files[1]).read_text()


def test_bench_lora_records_a_wrong_update_as_a_failure(monkeypatch):
    """A fused provider whose update is off gets no number (here: twice the update)."""
    from benchmarks import bench_lora

    real = bench_lora.make_provider

    class Doubled(nn.Module):
        def __init__(self, inner, base):
            super().__init__()
            self.inner, self.base = inner, base

        def forward(self, x):
            return 2 * self.inner(x) - self.base(x)

    def make(name, base):
        mod = real("eager-serial" if name == "fused-serial" else name, base)
        return Doubled(mod, base) if name == "fused-serial" else mod

    monkeypatch.setattr(bench_lora, "make_provider", make)
    rows = bench_lora.run("cpu", True, torch.float32, ["eager-serial", "fused-serial"], 1)
    assert [r["error"] is None for r in rows] == [True, False, True, False]
    assert all("wrong output" in r["error"] and "fwd_ms" not in r for r in rows[1::2])


@pytest.mark.parametrize("make_config", [lambda: SerialLoRAConfig(rank=4),
                                         lambda: MSPLoRAConfig(targets=["qkv"])],
                         ids=["serial", "msplora"])
def test_adapter_checkpoint_round_trip_through_inject(tmp_path, make_config):
    """save_adapter / load_adapter (the integration layer) also carry these configs exactly."""
    from mslora_kernels import load_adapter, save_adapter
    from mslora_kernels.models import VisionTransformer

    torch.manual_seed(0)
    model, fresh = VisionTransformer(), VisionTransformer()
    fresh.load_state_dict(model.state_dict())
    plain = copy.deepcopy(fresh)
    inject(model, make_config())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    save_adapter(model, tmp_path)
    load_adapter(fresh, tmp_path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), fresh(x))
    assert not torch.allclose(model(x), plain(x))  # the adapters do change the function
