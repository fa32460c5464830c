"""Small backbones that mirror timm's and torchvision's module names and classes.

They are what the demo trains and what the CPU tests inject into: ``inject`` recognises blocks by
their class names and structure, so these stand in for ResNet, Swin and ViT where timm and
torchvision are not installed. Every class and attribute name below is the one torchvision
(ResNet) or timm (Swin, ViT) uses; the arithmetic is simplified (Swin attends over the whole
stage instead of shifted windows), which placement does not look at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------------
# ResNet (torchvision.models.resnet names)
# ------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """torchvision's bottleneck: 1x1 (conv1) -> 3x3 (conv2) -> 1x1 (conv3), one shared ``relu``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, relu, maxpool, layer1..., avgpool, fc), small.

    Args:
        layers: bottlenecks per stage.
        widths: the inner (bottleneck) width of each stage; stage outputs are 4x that.
        in_chans, num_classes: input channels and classes.
        stem_width: channels of the 3x3 stem (stride 1, no max-pool: made for small images).
    """

    def __init__(self, layers=(1, 1, 1), widths=(8, 16, 32), in_chans: int = 3,
                 num_classes: int = 10, stem_width: int = 16) -> None:
        super().__init__()
        self.inplanes = stem_width
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            self.add_module(f"layer{i + 1}", self._make_layer(w, n, stride=1 if i == 0 else 2))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.inplanes
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride,
                          bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


# ------------------------------------------------------------------------------------------------
# Transformer parts (timm names: Attention.qkv/proj, Mlp.fc1/fc2)
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ------------------------------------------------------------------------------------------------
# Swin (timm >= 0.9 names and layout: blocks take and return (N, H, W, C))
# ------------------------------------------------------------------------------------------------
class SwinTransformerBlock(nn.Module):
    """timm's Swin block interface: (N, H, W, C) in and out, pre-norm attention and MLP."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int = 2,
                 mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        t = x.reshape(b, h * w, c)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return t.reshape(b, h, w, c)


class PatchMerging(nn.Module):
    """(N, H, W, C) -> (N, H/2, W/2, 2C), timm's names (norm, reduction)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int,
                 downsample: bool) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[SwinTransformerBlock(dim, resolution, num_heads) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: a strided conv; ``grid_size`` is the token grid; ``flatten`` picks
    (N, H*W, C) output (ViT) or (N, H, W, C) (Swin)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 flatten: bool = True) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        return x.flatten(1, 2) if self.flatten else x


class SwinTransformer(nn.Module):
    """timm's SwinTransformer layout (patch_embed, layers[i].blocks[j], norm, head), small."""

    def __init__(self, img_size: int = 16, patch_size: int = 2, in_chans: int = 3,
                 num_classes: int = 10, embed_dim: int = 16, depths=(2, 2),
                 num_heads=(2, 4)) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, flatten=False)
        g = self.patch_embed.grid_size
        stages = []
        for i, (d, h) in enumerate(zip(depths, num_heads, strict=True)):
            res = (g[0] // 2**i, g[1] // 2**i)
            stages.append(SwinTransformerStage(embed_dim * 2**i, res, d, h, downsample=i > 0))
        self.layers = nn.Sequential(*stages)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(self.patch_embed(x)))
        return self.head(x.mean(dim=(1, 2)))


# ------------------------------------------------------------------------------------------------
# ViT (timm.models.vision_transformer names)
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's ViT layout: patch_embed, cls_token, reg_token, pos_embed, blocks, norm, head.

    ``num_prefix_tokens`` (class + register tokens) lead the token sequence, as in timm. With
    ``dynamic_img_size`` (timm's option of that name) any image size whose sides are multiples of
    the patch size is taken: the patch embedding returns (N, H, W, C) and the position embedding
    is resampled to that grid before the tokens are flattened.
    """

    def __init__(self, img_size: int = 16, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 10, embed_dim: int = 32, depth: int = 2, num_heads: int = 2,
                 reg_tokens: int = 0, dynamic_img_size: bool = False) -> None:
        super().__init__()
        self.dynamic_img_size = dynamic_img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      flatten=not dynamic_img_size)
        self.num_prefix_tokens = 1 + reg_tokens
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, embed_dim) * 0.02) \
            if reg_tokens else None
        self.pos_embed = nn.Parameter(
            torch.randn(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim) * 0.02
        )
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def _pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position embedding for a grid_h x grid_w grid (bilinear, as timm resamples)."""
        p = self.num_prefix_tokens
        gh, gw = self.patch_embed.grid_size
        if (grid_h, grid_w) == (gh, gw):
            return self.pos_embed
        grid = self.pos_embed[:, p:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return torch.cat([self.pos_embed[:, :p], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.dynamic_img_size:
            pos = self._pos_embed(x.shape[1], x.shape[2])
            x = x.flatten(1, 2)
        else:
            pos = self.pos_embed
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1) + pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
