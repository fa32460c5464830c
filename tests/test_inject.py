"""inject / MSLoRAConfig placement, freezing, trainable_parameters, save_adapter / load_adapter.

The package's small models (mslora_kernels.models) mirror timm's and torchvision's names, so the
recognition logic is exercised on the CPU; the real timm / torchvision models are tested where
they can be imported (the GPU machine).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from mslora_kernels import (
    MSLoRA,
    MSLoRAConfig,
    inject,
    load_adapter,
    mslora_param_count,
    save_adapter,
    trainable_parameters,
)
from mslora_kernels.models import Bottleneck, ResNet, SwinTransformer, VisionTransformer

CFG = dict(rank=24, groups=4)  # small, and not a power of two


def randomize_adapters(model: nn.Module) -> None:
    """Non-zero `up` weights (a fresh adapter is the identity, which would hide placement bugs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MSLoRA):
                m.up.weight.normal_(0, 0.2)
                if m.options.prenorm:
                    m.norm.weight.normal_(1, 0.2)
                    m.norm.bias.normal_(0, 0.2)


def adapters(model: nn.Module) -> dict[str, MSLoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MSLoRA)}


def _resnet():
    return ResNet(layers=(2, 1, 1), widths=(8, 16, 32), in_chans=3, num_classes=5).eval()


def _swin():
    return SwinTransformer(img_size=16, patch_size=2, embed_dim=16, depths=(2, 2)).eval()


def _vit(reg=0):
    return VisionTransformer(img_size=20, patch_size=4, embed_dim=32, depth=2,
                             reg_tokens=reg).eval()


MODELS = {
    "resnet": (_resnet, (2, 3, 9, 7)),
    "swin": (_swin, (2, 3, 16, 16)),
    "vit": (_vit, (2, 3, 20, 20)),
    "vit_reg": (lambda: _vit(reg=2), (2, 3, 20, 20)),
    "torchvision_vit": (lambda: TorchvisionViT().eval(), (2, 3, 20, 20)),
}


# --------------------------------------------------------------------------------------------------
# Timm-style blocks, defined here with timm's class names and attributes
# --------------------------------------------------------------------------------------------------
class TimmBottleneck(nn.Module):
    """timm.models.resnet.Bottleneck's attributes: act1/act2/act3, drop_block, aa."""

    def __init__(self, c_in, width):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU()
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(width, c_in, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_in)
        self.act3 = nn.ReLU()

    def inner(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        return self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))

    def forward(self, x):
        return self.act3(self.bn3(self.conv3(self.inner(x))) + x)


TimmBottleneck.__name__ = "Bottleneck"


class OldTimmSwinBlock(nn.Module):
    """timm < 0.9: (N, H*W, C) in and out, grid from input_resolution."""

    def __init__(self, dim, res):
        super().__init__()
        self.dim, self.input_resolution = dim, res
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


OldTimmSwinBlock.__name__ = "SwinTransformerBlock"


class PreActBottleneck(nn.Module):
    """timm.models.resnetv2.PreActBottleneck: norm (BN+ReLU) before each conv, no output act."""

    def __init__(self, c_in, width):
        super().__init__()
        self.norm1 = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU())
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.norm2 = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm3 = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        self.conv3 = nn.Conv2d(width, c_in, 1, bias=False)

    def inner(self, x):
        return self.norm3(self.conv2(self.norm2(self.conv1(self.norm1(x)))))

    def forward(self, x):
        return self.conv3(self.inner(x)) + x


class PreActBasic(nn.Module):
    """timm.models.resnetv2.PreActBasic: two 3x3 convs, each after its norm (BN+ReLU)."""

    def __init__(self, c):
        super().__init__()
        self.norm1 = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm2 = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def inner(self, x):
        return self.norm2(self.conv1(self.norm1(x)))

    def forward(self, x):
        return self.conv2(self.inner(x)) + x


class EncoderBlock(nn.Module):
    """torchvision.models.vision_transformer.EncoderBlock's names: ln_1, self_attention, ln_2, mlp
    (the attention is a Linear here: placement does not look at it)."""

    def __init__(self, dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer layout: conv_proj, class_token, encoder.{pos_embedding,
    layers, ln}, heads; a fixed, square image_size."""

    def __init__(self, image_size=20, patch_size=4, dim=32, depth=2):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.conv_proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.encoder = nn.Module()
        n = (image_size // patch_size) ** 2 + 1
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.encoder.layers = nn.Sequential(*[EncoderBlock(dim) for _ in range(depth)])
        self.encoder.ln = nn.LayerNorm(dim)
        self.heads = nn.Linear(dim, 5)

    def forward(self, x):
        assert x.shape[-2:] == (self.image_size, self.image_size)
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder.ln(self.encoder.layers(x + self.encoder.pos_embedding))
        return self.heads(x[:, 0])


TorchvisionViT.__name__ = "VisionTransformer"


# --------------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_identity_at_init(name):
    make, shape = MODELS[name]
    model = make()
    x = torch.randn(shape)
    before = model(x)
    inject(model, MSLoRAConfig(**CFG))
    assert len(adapters(model)) > 0
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", list(MODELS))
def test_empty_batch_through_injected_model(name):
    """An empty batch goes through every placement (the token and grid reshapes included), as
    it goes through the model without adapters."""
    make, shape = MODELS[name]
    model = make()
    x = torch.randn((0, *shape[1:]))
    before = model(x)
    inject(model, MSLoRAConfig(**CFG))
    out = model(x)
    assert out.shape == before.shape and out.shape[0] == 0
    out.sum().backward()
    grads = [a.up.weight.grad for a in adapters(model).values()]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_param_count_resnet_small():
    model = _resnet()
    inner = [b.conv3.in_channels for b in model.modules() if isinstance(b, Bottleneck)]
    inject(model, MSLoRAConfig(**CFG))
    expected = sum(mslora_param_count(c, **CFG) for c in inner)
    assert trainable_parameters(model).trainable == expected
    assert sorted(adapters(model)) == ["layer1.0.mslora", "layer1.1.mslora", "layer2.0.mslora",
                                       "layer3.0.mslora"]


@pytest.mark.parametrize("name", ["swin", "vit", "torchvision_vit"])
def test_param_count_transformers_small(name):
    model = MODELS[name][0]()
    widths = [getattr(b, "norm1", getattr(b, "ln_1", None)).normalized_shape[0]
              for n, b in model.named_modules()
              if type(b).__name__ in ("SwinTransformerBlock", "Block", "EncoderBlock")]
    inject(model, MSLoRAConfig(**CFG))
    # SPEC's count plus the prenorm LayerNorm's 2C per block
    expected = sum(mslora_param_count(c, **CFG) + 2 * c for c in widths)
    assert trainable_parameters(model).trainable == expected
    assert len(adapters(model)) == len(widths)
    assert all(a.options.prenorm and a.options.data_format == "channels_last"
               for a in adapters(model).values())


def test_resnet_placement_after_conv2_bn2_act2():
    for block, c in ((Bottleneck(32, 8), 32), (TimmBottleneck(16, 8), 16)):
        block.eval()
        x = torch.randn(2, c, 7, 5)
        inject(block, MSLoRAConfig(**CFG))
        randomize_adapters(block)
        a = block.mslora
        with torch.no_grad():
            if isinstance(block, Bottleneck):
                inner = block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))
                want = block.relu(block.bn3(block.conv3._conv_forward(
                    a(inner), block.conv3.weight, None)) + x)
            else:
                want = block.act3(block.bn3(block.conv3._conv_forward(
                    a(block.inner(x)), block.conv3.weight, None)) + x)
            got = block(x)
        assert a.options.channels == 8 and not a.options.prenorm
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("block", [PreActBottleneck(16, 8), PreActBasic(8)],
                         ids=["bottleneck", "basic"])
def test_preact_resnet_placement_after_the_3x3_and_its_bn_relu(block):
    """timm's ResNetV2: the adapter takes the last conv's input, norm(conv 3x3 (...))."""
    block.eval()
    for bn in block.modules():  # non-trivial BatchNorm statistics
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, block.conv1.in_channels, 7, 5)
    inject(block, MSLoRAConfig(**CFG))
    randomize_adapters(block)
    a = block.mslora
    last = block.conv3 if isinstance(block, PreActBottleneck) else block.conv2
    with torch.no_grad():
        want = last._conv_forward(a(block.inner(x)), last.weight, None) + x
        got = block(x)
    assert a.options.channels == 8 and not a.options.prenorm
    assert not torch.equal(a(block.inner(x)), block.inner(x))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_swin_placement_end_of_block():
    model = _swin()
    blk = model.layers[1].blocks[0]
    x = torch.randn(2, 4, 4, 32)
    ref = blk(x)
    inject(model, MSLoRAConfig(**CFG))
    randomize_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), blk.mslora(ref), rtol=0, atol=0)
        assert not torch.equal(blk(x), ref)


def test_old_timm_swin_tokens():
    blk = OldTimmSwinBlock(16, (3, 5))
    x = torch.randn(2, 15, 16)
    ref = blk(x)
    inject(blk, MSLoRAConfig(**CFG))
    randomize_adapters(blk)
    with torch.no_grad():
        want = blk.mslora(ref.reshape(2, 3, 5, 16)).reshape(2, 15, 16)
        torch.testing.assert_close(blk(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("reg", [0, 2])
def test_vit_placement_prefix_tokens_pass_through(reg):
    model = _vit(reg)
    blk = model.blocks[1]
    p = 1 + reg
    x = torch.randn(2, p + 25, 32)
    ref = blk(x)
    inject(model, MSLoRAConfig(**CFG))
    randomize_adapters(model)
    with torch.no_grad():
        got = blk(x)
        torch.testing.assert_close(got[:, :p], ref[:, :p], rtol=0, atol=0)
        want = blk.mslora(ref[:, p:].reshape(2, 5, 5, 32)).reshape(2, 25, 32)
        torch.testing.assert_close(got[:, p:], want, rtol=0, atol=0)


def test_torchvision_vit_placement_class_token_passes_through():
    model = TorchvisionViT(image_size=24, patch_size=4).eval()  # a 6x6 grid
    blk = model.encoder.layers[1]
    x = torch.randn(2, 1 + 36, 32)
    ref = blk(x)
    inject(model, MSLoRAConfig(**CFG))
    randomize_adapters(model)
    assert sorted(adapters(model)) == ["encoder.layers.0.mslora", "encoder.layers.1.mslora"]
    with torch.no_grad():
        got = blk(x)
        torch.testing.assert_close(got[:, :1], ref[:, :1], rtol=0, atol=0)
        want = blk.mslora(ref[:, 1:].reshape(2, 6, 6, 32)).reshape(2, 36, 32)
        torch.testing.assert_close(got[:, 1:], want, rtol=0, atol=0)
        assert not torch.equal(got, ref)
        assert not torch.equal(model(torch.randn(2, 3, 24, 24)), model.heads.bias.expand(2, 5))


# ViT grids: the patch embedding's grid of this forward, never a guess from the token count.
# (32, 8) makes a 8x2 grid of 16 tokens, which a square guess would lay out as 4x4.
DYN_SIZES = [(20, 20), (32, 8), (12, 28), (8, 8)]


def _dyn_vit():
    return VisionTransformer(img_size=20, patch_size=4, embed_dim=32, depth=2, reg_tokens=1,
                             dynamic_img_size=True).eval()


def _injected_dyn_vit():
    """``_dyn_vit()`` (seed 0) with MSLoRA injected and non-zero adapters."""
    torch.manual_seed(0)
    model = _dyn_vit()
    inject(model, MSLoRAConfig(**CFG))
    randomize_adapters(model)
    return model


def _with_explicit_grid(model, grid, make=_dyn_vit, cfg=CFG):
    """A copy of the injected ViT ``model`` (a fresh ``make()``, the same weights) whose adapters
    sit on the same block outputs with the grid given explicitly (data_format="tokens")."""
    plain = make()
    inject(plain, MSLoRAConfig(**cfg, targets=r"blocks\.\d+", data_format="tokens",
                               num_prefix_tokens=model.num_prefix_tokens, grid_size=grid,
                               prenorm=True))
    plain.load_state_dict(model.state_dict())
    return plain


@pytest.mark.parametrize("hw", DYN_SIZES)
def test_vit_dynamic_img_size_uses_the_embedded_grid(hw):
    model = _injected_dyn_vit()
    x = torch.randn(2, 3, *hw)
    want = _with_explicit_grid(model, (hw[0] // 4, hw[1] // 4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want(x), rtol=0, atol=0)


def test_vit_grid_survives_checkpointing_across_sizes():
    """Blocks checkpointed, several steps: each recomputed block finds its own forward's grid,
    in steps at grids with the same token count (8x2, then 4x4: each backward ends the last
    step's grids, also in the run without checkpointing before), and with two sizes in one
    backward (multi-crop); the gradients match a run without checkpointing."""
    model = _injected_dyn_vit()
    steps = [[(32, 8)], [(16, 16)], [(20, 20), (12, 28)], [(32, 8), (12, 28)]]
    steps = [[torch.randn(2, 3, *hw) for hw in step] for step in steps]

    params = dict(model.named_parameters())

    def run(ckpt):
        blocks = model.blocks
        if ckpt:
            model.blocks = nn.Sequential(*[_Checkpointed(b) for b in blocks])
        got = []
        try:
            for xs in steps:
                model.zero_grad(set_to_none=True)
                sum(model(x).square().mean() for x in xs).backward()
                got.append({n: q.grad.clone() for n, q in params.items() if q.grad is not None})
        finally:
            model.blocks = blocks
        return got

    want, got = run(False), run(True)
    for w, g in zip(want, got, strict=True):
        assert set(g) == set(w) and any("mslora" in n for n in g)
        for n in w:
            torch.testing.assert_close(g[n], w[n], rtol=1e-5, atol=1e-7)


class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def test_vit_same_token_count_two_grids():
    """8x2 and 4x4 grids both make 16 tokens: plain forwards use each forward's own grid; a
    checkpointed backward over both cannot tell them apart and says so instead of guessing."""
    model = _injected_dyn_vit()
    a, b = torch.randn(2, 3, 32, 8), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out_a, out_b = model(a), model(b)
        torch.testing.assert_close(out_a, _with_explicit_grid(model, (8, 2))(a), rtol=0, atol=0)
        torch.testing.assert_close(out_b, _with_explicit_grid(model, (4, 4))(b), rtol=0, atol=0)
        torch.testing.assert_close(model(a), out_a, rtol=0, atol=0)  # and again, after b
    model.blocks = nn.Sequential(*[_Checkpointed(blk) for blk in model.blocks])
    loss = model(a).sum() + model(b).sum()
    with pytest.raises(ValueError, match="same token count"):
        loss.backward()


def test_vit_dropped_tokens_are_refused():
    """Token dropping (timm's patch_drop_rate) leaves no grid: a clear error, never a guess."""
    model = _vit()
    inject(model, MSLoRAConfig(**CFG))
    tokens = model.patch_embed(torch.randn(2, 3, 20, 20))  # a 5x5 grid
    kept = torch.cat([torch.randn(2, 1, 32), tokens[:, :16]], dim=1)  # 16 of 25: square, 4x4
    with pytest.raises(ValueError, match="16 patch tokens.*5x5 grid.*patch_drop_rate"):
        model.blocks(kept)


def test_vit_dynamic_traces_without_graph_breaks_and_compiles():
    model = _injected_dyn_vit()
    x = torch.randn(2, 3, 32, 8)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for hw in DYN_SIZES:  # the second size recompiles with dynamic H and W
            x = torch.randn(2, 3, *hw)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_targets_suffix_and_regex_channels_first():
    model = _resnet()
    x = torch.randn(2, 3, 9, 7)
    inject(model, MSLoRAConfig(**CFG, targets=["layer2.0.conv1", "conv2"]))
    names = set(adapters(model))
    blocks = ("layer1.0", "layer1.1", "layer2.0", "layer3.0")
    assert names == {f"{b}.conv2.mslora" for b in blocks} | {"layer2.0.conv1.mslora"}
    randomize_adapters(model)
    conv = model.layer2[0].conv1
    with torch.no_grad():
        h = torch.randn(2, 32, 5, 4)
        torch.testing.assert_close(conv(h), conv.mslora(conv._conv_forward(h, conv.weight, None)),
                                   rtol=0, atol=0)
    model(x).sum().backward()

    model = _resnet()
    inject(model, MSLoRAConfig(**CFG, targets=r"layer\d\.0\.bn2"))
    assert sorted(adapters(model)) == [f"layer{i}.0.bn2.mslora" for i in (1, 2, 3)]


def test_targets_channels_last_and_tokens():
    model = _swin()
    inject(model, MSLoRAConfig(**CFG, targets=["reduction"], data_format="channels_last"))
    assert list(adapters(model)) == ["layers.1.downsample.reduction.mslora"]
    model(torch.randn(2, 3, 16, 16))

    model = _vit(reg=2)
    x = torch.randn(2, 3, 20, 20)
    inject(model, MSLoRAConfig(**CFG, targets=["attn.proj"], data_format="tokens",
                               num_prefix_tokens=3, grid_size=(5, 5)))
    randomize_adapters(model)
    proj = model.blocks[0].attn.proj
    t = torch.randn(2, 28, 32)
    with torch.no_grad():
        base = nn.functional.linear(t, proj.weight, proj.bias)
        got = proj(t)
        torch.testing.assert_close(got[:, :3], base[:, :3], rtol=0, atol=0)
        want = proj.mslora(base[:, 3:].reshape(2, 5, 5, 32)).reshape(2, 25, 32)
        torch.testing.assert_close(got[:, 3:], want, rtol=0, atol=0)
    model(x)


def test_nothing_to_adapt_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match="found nothing to adapt in Sequential"):
        inject(model, MSLoRAConfig(**CFG))
    with pytest.raises(ValueError, match="found nothing to adapt"):
        inject(_resnet(), MSLoRAConfig(**CFG, targets=["no_such_module"]))


def test_bad_sites_and_configs_are_refused():
    model = _resnet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'layer1.1.bn1'.*divisible by groups"):
        # layer1.0.conv2 (8 channels) fits G=2; layer1.1.bn1 (8) does not fit G=3
        inject(model, MSLoRAConfig(rank=12, groups=3, targets=["layer1.1.bn1"]))
    assert not adapters(model) and model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="cannot tell the output channel count of 'relu'"):
        inject(model, MSLoRAConfig(**CFG, targets=["relu"]))
    with pytest.raises(ValueError, match="kernel size 4 is even"):
        MSLoRAConfig(kernel_sizes=(3, 4))
    with pytest.raises(ValueError, match="data_format"):
        MSLoRAConfig(data_format="NHWC")
    with pytest.raises(ValueError, match="backend"):
        MSLoRAConfig(backend="fast")
    with pytest.raises(TypeError, match="targets"):
        MSLoRAConfig(targets=[1, 2])
    with pytest.raises(ValueError, match=r"D % G"):
        MSLoRAConfig(rank=10, groups=4)
    inject(model, MSLoRAConfig(**CFG))
    with pytest.raises(ValueError, match="already has an attribute 'mslora'"):
        inject(model, MSLoRAConfig(**CFG))
    with pytest.raises(TypeError, match="inject into the model first"):
        inject(nn.DataParallel(_resnet()), MSLoRAConfig(**CFG))


def test_tokens_grid_error_names_the_problem():
    model = _vit()
    inject(model, MSLoRAConfig(**CFG, targets=["attn.proj"], data_format="tokens",
                               num_prefix_tokens=1, grid_size=(4, 6)))
    with pytest.raises(ValueError, match="cannot lay 26 patch tokens"):
        model.blocks[0].attn.proj(torch.randn(2, 27, 32))  # 26 patch tokens: neither 4x6 nor square


# --------------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------------
def test_freezing_and_trainable_head():
    model = _resnet()
    inject(model, MSLoRAConfig(**CFG, trainable=["fc"]))
    for n, p in model.named_parameters():
        assert p.requires_grad == (".mslora." in n or n.startswith("fc.")), n
    head = model.fc.weight.numel() + model.fc.bias.numel()
    adapter_params = sum(p.numel() for a in adapters(model).values() for p in a.parameters())
    counts = trainable_parameters(model)
    assert counts.trainable == adapter_params + head
    assert counts.total == sum(p.numel() for p in model.parameters())
    pct = 100 * counts.trainable / counts.total
    assert str(counts) == (f"trainable params: {counts.trainable:,} || all params: "
                           f"{counts.total:,} || trainable%: {pct:.4f}")


def test_batchnorm_statistics_frozen_after_train():
    model = _resnet()
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    inject(model, MSLoRAConfig(**CFG))
    randomize_adapters(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    assert model.training and all(a.training for a in adapters(model).values())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    x = torch.randn(4, 3, 9, 7)
    out = model(x)
    out.square().mean().backward()
    model.train(True)
    model(x)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    # the frozen BN normalises with the running statistics, as in eval mode
    torch.testing.assert_close(out, model.eval()(x), rtol=0, atol=0)


def _clones(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``model`` copied by copy.deepcopy and through torch.save / torch.load."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return copy.deepcopy(model), torch.load(buf, weights_only=False)


def test_deepcopy_and_pickle_keep_adapters_and_frozen_bn():
    model = _resnet()
    inject(model, MSLoRAConfig(**CFG))
    randomize_adapters(model)
    x = torch.randn(2, 3, 9, 7)
    want = model(x)
    for clone in _clones(model):
        with torch.no_grad():  # the clone's own adapters must be the ones used
            clone.layer1[0].mslora.up.weight.zero_()
        clone.train()
        assert not any(m.training for m in clone.modules() if isinstance(m, nn.BatchNorm2d))
        assert not torch.equal(clone(x), want)
        assert torch.equal(model(x), want)


def test_deepcopy_and_pickle_keep_the_vit_grid_hook():
    model = _injected_dyn_vit()
    x = torch.randn(2, 3, 32, 8)
    want = model(x)
    for clone in _clones(model):
        assert torch.equal(clone(x), want)
        # the clone's blocks read the grid its own patch embedding records, not the original's
        (grid_hook,) = clone.patch_embed._forward_hooks.values()
        for blk in clone.blocks:
            (adapter_hook,) = blk._forward_hooks.values()
            assert adapter_hook.tokens.patch_grid is grid_hook
            assert adapter_hook.adapter is blk.mslora
        (orig_hook,) = model.patch_embed._forward_hooks.values()
        assert grid_hook is not orig_hook


# --------------------------------------------------------------------------------------------------
# Adapter checkpoints
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_reproduces_outputs_exactly(name, tmp_path):
    make, shape = MODELS[name]
    torch.manual_seed(1)
    base = make()
    base_state = copy.deepcopy(base.state_dict())
    head = [{"resnet": "fc", "torchvision_vit": "heads"}.get(name, "head")]
    model = inject(base, MSLoRAConfig(**CFG, trainable=head))
    randomize_adapters(model)
    with torch.no_grad():
        model.get_submodule(head[0]).weight.normal_()
    x = torch.randn(shape)
    want = model(x)
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()

    torch.manual_seed(2)  # a freshly built base model with the same pre-trained weights
    fresh = make()
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), want)
    assert trainable_parameters(fresh).trainable == trainable_parameters(model).trainable

    # into a model that already has the same adapters (e.g. to resume): weights only
    again = inject(make(), MSLoRAConfig(**CFG, trainable=head))
    again.load_state_dict(base_state, strict=False)
    load_adapter(again, tmp_path)
    assert torch.equal(again(x), want)


def test_checkpoint_holds_only_adapters_and_head(tmp_path):
    from safetensors.torch import load_file

    model = inject(_resnet(), MSLoRAConfig(**CFG, trainable=["fc"]))
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    assert keys == want
    assert all(".mslora." in k or k.startswith("fc.") for k in keys)


def test_load_refuses_mismatches(tmp_path):
    model = inject(_resnet(), MSLoRAConfig(**CFG))
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="saved from a ResNet model, but this model is a "
                                         "VisionTransformer"):
        load_adapter(_vit(), tmp_path)
    deeper = ResNet(layers=(3, 1, 1), widths=(8, 16, 32), num_classes=5)
    with pytest.raises(ValueError, match=r"sites 'layer1.2' that were not saved"):
        load_adapter(deeper, tmp_path)
    wider = ResNet(layers=(2, 1, 1), widths=(8, 16, 64), num_classes=5)
    with pytest.raises(ValueError, match=r"'layer3.0.mslora.proj.weight': file \(24, 8, 1, 1\), "
                                         r"model \(24, 16, 1, 1\)"):
        load_adapter(wider, tmp_path)
    other = inject(_resnet(), MSLoRAConfig(rank=16, groups=4))
    with pytest.raises(ValueError, match="different config: rank: saved 24, model has 16"):
        load_adapter(other, tmp_path)
    with pytest.raises(ValueError, match="has no adapters"):
        save_adapter(_resnet(), tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(_resnet(), tmp_path / "missing")


def test_load_backend_override(tmp_path):
    model = inject(_resnet(), MSLoRAConfig(**CFG, backend="reference"))
    save_adapter(model, tmp_path)
    fresh = load_adapter(_resnet(), tmp_path, backend="auto")
    assert {a.backend for a in adapters(fresh).values()} == {"auto"}


def test_save_through_wrappers_and_submodule(tmp_path):
    outer = nn.Sequential()
    outer.add_module("backbone", _resnet())
    inject(outer.backbone, MSLoRAConfig(**CFG))
    randomize_adapters(outer)
    x = torch.randn(2, 3, 9, 7)
    want = outer(x)
    save_adapter(nn.DataParallel(outer), tmp_path)
    fresh = nn.Sequential()
    fresh.add_module("backbone", _resnet())
    fresh.backbone.load_state_dict(outer.backbone.state_dict(), strict=False)
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), want)


@pytest.mark.gpu
def test_fsdp1_wrapped_models_are_refused_gpu(tmp_path):
    """FSDP1 needs an accelerator. Its flat parameters hide the adapters' names from save_adapter,
    and adapters injected after wrapping would be left out of its sharding. (FSDP2 under gloo,
    which does run on a CPU: tests/test_training.py.)"""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    model = inject(_resnet(), MSLoRAConfig(**CFG))
    save_adapter(model, tmp_path)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dev = torch.cuda.current_device()
        with pytest.raises(TypeError, match="save_adapter: the model is wrapped in FullyShar"):
            save_adapter(FSDP(model.cuda(), device_id=dev), tmp_path / "again")
        with pytest.raises(TypeError, match="inject: the model is wrapped in FullyShardedDataP"):
            inject(FSDP(_resnet().cuda(), device_id=dev), MSLoRAConfig(**CFG))
        with pytest.raises(TypeError, match="load_adapter: the model is wrapped in FullyShard"):
            load_adapter(FSDP(_resnet().cuda(), device_id=dev), tmp_path)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# timm / torchvision (on machines where they are installed: the GPU machine)
# --------------------------------------------------------------------------------------------------
RESNET50_MSLORA = 794_624  # SPEC: 0.79M
SWINB_MSLORA = 1_803_264  # SPEC: 1.80M, without the prenorm LayerNorm's 2C per block
SWINB_LN = 2 * (2 * 128 + 2 * 256 + 18 * 512 + 2 * 1024)


def _check_model(model, expected, shape):
    model.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        before = model(x)
    inject(model, MSLoRAConfig())
    assert trainable_parameters(model).trainable == expected
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        randomize_adapters(model)
        assert not torch.equal(model(x), before)


def test_torchvision_resnet50_swin_b_vit():
    tvm = pytest.importorskip("torchvision.models")
    _check_model(tvm.resnet50(), RESNET50_MSLORA, (1, 3, 64, 64))
    _check_model(tvm.swin_b(), SWINB_MSLORA + SWINB_LN, (1, 3, 224, 224))
    vit = tvm.vit_b_16()
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision zero-inits the head
    _check_model(vit, 12 * (mslora_param_count(768) + 2 * 768), (1, 3, 224, 224))


def test_timm_preact_resnetv2_50():
    timm = pytest.importorskip("timm")
    # zero_init_last would zero conv3, right after the adapter, and hide it from the output
    _check_model(timm.create_model("resnetv2_50", zero_init_last=False), RESNET50_MSLORA,
                 (1, 3, 64, 64))


def test_timm_resnet50_swin_b_vit():
    timm = pytest.importorskip("timm")
    # timm zero-initialises each block's last BatchNorm (bn3, right after the adapter's conv3),
    # which would hide the adapters from the output
    _check_model(timm.create_model("resnet50", zero_init_last=False), RESNET50_MSLORA,
                 (1, 3, 64, 64))
    _check_model(timm.create_model("swin_base_patch4_window7_224"), SWINB_MSLORA + SWINB_LN,
                 (1, 3, 224, 224))
    vit = timm.create_model("vit_base_patch16_224")
    _check_model(vit, 12 * (mslora_param_count(768) + 2 * 768), (1, 3, 224, 224))


def test_timm_vit_dynamic_img_size_any_grid():
    """timm's ViT at image sizes other than its own, square or not (a 16x4 grid has 64 tokens,
    as an 8x8 one does): the same as the adapters placed with the grid given explicitly."""
    timm = pytest.importorskip("timm")
    cfg = dict(rank=16, groups=4)

    def make():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                                 dynamic_img_size=True).eval()

    model = make()
    inject(model, MSLoRAConfig(**cfg))
    randomize_adapters(model)
    for hw in [(256, 64), (224, 160), (96, 96)]:
        x = torch.randn(1, 3, *hw)
        want = _with_explicit_grid(model, (hw[0] // 16, hw[1] // 16), make, cfg)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want(x), rtol=0, atol=0)

    # timm's own activation checkpointing: two sizes in one backward, then 8x2 and 4x4 grids
    # (16 tokens each) in two later steps; gradients as without checkpointing
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    steps = [[(96, 160), (64, 64)], [(128, 32)], [(64, 64)]]
    steps = [[torch.randn(2, 3, *hw) for hw in step] for step in steps]

    def run(ckpt):
        model.set_grad_checkpointing(ckpt)
        got = []
        for xs in steps:
            model.zero_grad(set_to_none=True)
            sum(model(x).square().mean() for x in xs).backward()
            got.append({n: q.grad.clone() for n, q in params.items()})
        return got

    model.train()
    for w, g in zip(run(False), run(True), strict=True):
        for n in w:
            torch.testing.assert_close(g[n], w[n], rtol=1e-5, atol=1e-7)


def test_inject_protocol_freezes_for_any_config():
    """A config from another adapter family (issue 7's protocol): only `_inject` is needed."""

    class Extra(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.a = nn.Parameter(torch.randn(2, d))

    class OtherConfig:
        trainable = ["fc"]

        def _inject(self, model):
            model.layer1[0].add_module("extra", Extra(4))
            return ["layer1.0"]

    model = _resnet()
    inject(model, OtherConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer1.0.extra.a", "fc.weight", "fc.bias"}
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # a second inject keeps the first one's adapters trainable
    inject(model, MSLoRAConfig(**CFG))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"layer1.0.extra.a", "layer1.0.mslora.pw.weight"} <= trainable


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (ResNet-18/34): conv1 -> bn1 -> relu -> conv2 -> bn2."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_basic_block_placement_after_conv1_bn1_act1():
    block = BasicBlock(12).eval()
    x = torch.randn(2, 12, 5, 6)
    inject(block, MSLoRAConfig(rank=12, groups=4))
    randomize_adapters(block)
    with torch.no_grad():
        inner = block.mslora(block.relu(block.bn1(block.conv1(x))))
        want = block.relu(block.bn2(block.conv2._conv_forward(inner, block.conv2.weight, None)) + x)
        torch.testing.assert_close(block(x), want, rtol=0, atol=0)
