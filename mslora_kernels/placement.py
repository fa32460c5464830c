"""Where MSLoRA goes in a model: ``MSLoRAConfig`` and its placement (SPEC section 1).

``inject(model, MSLoRAConfig(...))`` (in :mod:`mslora_kernels.inject`) calls
``MSLoRAConfig._inject(model)``, which finds the sites, builds one :class:`~mslora_kernels.MSLoRA`
per site and attaches it with a forward hook. The hooks leave every existing module and parameter
name of the model as it was, so the base model's own state dict still loads after ``inject``; each
adapter is a child module named ``mslora`` of the module it belongs to (its parameters are
``<site>.mslora.proj.weight`` and so on, SPEC's checkpoint names under the site's prefix).

Placement with ``targets="auto"``:

- ResNet ``Bottleneck`` (timm and torchvision): one adapter per block on its inner width, applied
  to the input of ``conv3``, that is after ``conv2 -> bn2 -> act2`` (and timm's ``aa``, an
  identity unless anti-aliasing is on). Registered as ``<block>.mslora``.
- ResNet ``BasicBlock`` (ResNet-18/34, beyond SPEC's tables): the same idea, on the input of
  ``conv2`` (after ``conv1 -> bn1 -> act1``).
- timm's pre-activation ResNetV2 blocks, ``PreActBottleneck`` and ``PreActBasic``: the same
  sites, the input of ``conv3`` (after ``conv2 -> norm3``, norm3 being BatchNorm and ReLU) and of
  ``conv2`` (after ``conv1 -> norm2``).
- Swin blocks (timm ``SwinTransformerBlock``, torchvision ``SwinTransformerBlock`` and
  ``SwinTransformerBlockV2``): one adapter on the block's output, channels-last ``(N, H, W, C)``,
  ``prenorm=True``. Old timm blocks that return ``(N, H*W, C)`` are reshaped with the block's
  ``input_resolution``.
- Plain ViT (timm ``VisionTransformer`` and relatives: a module with ``patch_embed``, ``blocks``
  and ``num_prefix_tokens``): one adapter on the output of every block, on the patch tokens
  reshaped to their grid; the class and register tokens pass through untouched; ``prenorm=True``.
  The grid is the one the patch embedding made in this forward (a hook on ``patch_embed`` reads
  it), so timm's ``dynamic_img_size`` works at any image size, square or not.
- torchvision's ``VisionTransformer`` (``conv_proj``, ``encoder.layers``): the same, on the
  output of every ``EncoderBlock``, with its class token passed through; its image size is
  fixed, so its grid is ``image_size // patch_size`` on each side.

With ``targets`` given (a list of module-name suffixes or a regex, PEFT's rule), the adapter
transforms the output of each module named, laid out as ``data_format`` says:
``"channels_first"`` (N, C, H, W), ``"channels_last"`` (N, H, W, C) or ``"tokens"``
(N, P + H*W, C) with ``num_prefix_tokens`` P passed through and the grid ``grid_size`` (or square).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import MSLoRAOptions, validate_backend
from .inject import matches_target
from .modules import MSLoRA

TARGET_FORMATS = ("channels_first", "channels_last", "tokens")
ADAPTER_NAME = "mslora"

# ResNet blocks by class name -> the conv whose input the adapter transforms (the one after the
# 3x3 and its norm and activation). timm's ResNetV2 has pre-activation blocks of the same shape.
RESNET_BLOCKS = {"Bottleneck": "conv3", "PreActBottleneck": "conv3",
                 "BasicBlock": "conv2", "PreActBasic": "conv2"}
SWIN_BLOCKS = ("SwinTransformerBlock", "SwinTransformerBlockV2", "SwinTransformerV2Block")


def _as_patterns(value, field: str):
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(
        f"MSLoRAConfig: {field} must be a regex string or a list of module-name suffixes, "
        f"got {value!r}"
    )


@dataclass(frozen=True)
class MSLoRAConfig:
    """How to place MSLoRA adapters into a model (the argument of :func:`inject`).

    Args:
        rank, groups, kernel_sizes, enhance, pool, gate, shuffle: the adapter's hyper-parameters
            (SPEC section 1), the same at every site.
        backend: the backend every adapter uses (``"auto"``: fused on a GPU, reference on a CPU).
        targets: ``"auto"`` places adapters into the ResNet, Swin and ViT blocks it recognises;
            otherwise PEFT's ``target_modules``: a list of module-name suffixes, or a regex string
            matched against full module names. The adapter transforms each named module's output.
        data_format: the layout of the named modules' outputs (only with explicit ``targets``):
            ``"channels_first"``, ``"channels_last"`` or ``"tokens"``.
        trainable: module-name patterns (same rule as ``targets``) that also stay trainable,
            such as a task head. Their weights are saved with the adapters.
        prenorm: the adapter's input LayerNorm. ``None`` chooses per site: on in Swin and ViT
            blocks (SPEC), off in ResNet blocks and in named targets.
        num_prefix_tokens, grid_size: for ``data_format="tokens"``: the leading tokens that pass
            through, and the (H, W) grid of the rest (``None``: a square grid).
    """

    rank: int = 128
    groups: int = 4
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    enhance: bool = False
    pool: bool = False
    gate: bool = False
    shuffle: bool = False
    backend: str = "auto"
    targets: str | tuple[str, ...] = "auto"
    data_format: str = "channels_first"
    trainable: str | tuple[str, ...] = ()
    prenorm: bool | None = None
    num_prefix_tokens: int = 0
    grid_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_sizes", tuple(self.kernel_sizes))
        object.__setattr__(self, "targets", _as_patterns(self.targets, "targets"))
        object.__setattr__(self, "trainable", _as_patterns(self.trainable, "trainable"))
        if self.grid_size is not None:
            gs = tuple(self.grid_size)
            if len(gs) != 2 or not all(isinstance(v, int) and v > 0 for v in gs):
                raise ValueError(
                    "MSLoRAConfig: grid_size must be two positive ints (H, W), "
                    f"got {self.grid_size!r}"
                )
            object.__setattr__(self, "grid_size", gs)
        # The adapter's own checks (positive sizes, D % G, odd kernels), run once here so that a
        # bad config fails before anything is placed. channels=groups always divides.
        MSLoRAOptions(self.groups, self.rank, self.groups, self.kernel_sizes)
        validate_backend(self.backend)
        if self.data_format not in TARGET_FORMATS:
            raise ValueError(
                f"MSLoRAConfig: unknown data_format {self.data_format!r}; expected one of "
                f"{TARGET_FORMATS}"
            )
        if isinstance(self.num_prefix_tokens, bool) or not isinstance(self.num_prefix_tokens, int) \
                or self.num_prefix_tokens < 0:
            raise ValueError(
                "MSLoRAConfig: num_prefix_tokens must be an int >= 0, "
                f"got {self.num_prefix_tokens!r}"
            )
        if self.prenorm not in (None, True, False):
            raise ValueError(
                f"MSLoRAConfig: prenorm must be None, True or False, got {self.prenorm!r}"
            )

    # -- serialisation (adapter_config.json) ------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> MSLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MSLoRAConfig: unknown fields {unknown} in the saved config")
        return cls(**d)

    # -- placement --------------------------------------------------------------------------------
    def _inject(self, model: nn.Module) -> list[str]:
        """Place one adapter at every site; return the names of the modules adapted."""
        if self.targets == "auto":
            sites, grid_hooks = _auto_sites(model, self)
        else:
            sites, grid_hooks = _target_sites(model, self), []
        # Build every adapter before attaching any, so that a site that cannot take one (e.g.
        # C % G != 0) leaves the model untouched.
        adapters = [site.build(self) for site in sites]
        for site, adapter in zip(sites, adapters, strict=True):
            site.attach(adapter)
        for patch_embed, hook in grid_hooks:
            patch_embed.register_forward_hook(hook)
        return [s.name for s in sites]


# --------------------------------------------------------------------------------------------------
# Hooks: apply an adapter to a module's output, or to its input.
# Plain objects (not closures), so that copy.deepcopy and pickle of the model carry them along
# with the adapter they hold.
# --------------------------------------------------------------------------------------------------
class _TokenGrid:
    """(N, P + H*W, C) tokens <-> (N, H, W, C) grid, with the P prefix tokens passed through."""

    def __init__(self, num_prefix_tokens: int, grid_size: tuple[int, int] | None) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = grid_size

    def grid(self, n_patches: int) -> tuple[int, int]:
        if self.grid_size is not None and self.grid_size[0] * self.grid_size[1] == n_patches:
            return self.grid_size
        side = math.isqrt(n_patches)
        if side * side == n_patches:
            return side, side
        raise ValueError(
            f"MSLoRA: cannot lay {n_patches} patch tokens out on a grid: expected "
            f"{self.grid_size} (H*W tokens) or a square number; set grid_size in MSLoRAConfig"
        )

    def apply(self, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(
                "MSLoRA: expected tokens (N, P + H*W, C), "
                f"got a {x.dim()}-D tensor {tuple(x.shape)}"
            )
        n, length, c = x.shape
        p = self.num_prefix_tokens
        gh, gw = self.grid(length - p)
        y = adapter(x[:, p:].reshape(n, gh, gw, c)).reshape(n, gh * gw, c)
        return torch.cat([x[:, :p], y], dim=1) if p else y


class _PatchGrid:
    """A forward hook on a ViT's ``patch_embed``: the (H, W) grid of the patch tokens it makes.

    Its blocks see flat tokens (N, P + H*W, C), and with timm's ``dynamic_img_size`` any H and W,
    so the grid cannot be told from the token count (a 16x4 grid and an 8x8 one both make 64).
    Each forward of the patch embedding records its grid (see ``_embedding_grid``):

    - ``current``: the latest forward's grid, which the blocks of that forward use;
    - ``pending``: per token count, the grid of the forwards with grad since the last backward
      (``None`` where two grids had that count). A block recomputed in a backward (activation
      checkpointing) looks its grid up here, since the latest forward may have had another size
      (multi-crop training).

    A backward is noticed by a hook on the first adapted block's output of each forward, or by
    a recomputation; the next forward then starts ``pending`` afresh.
    """

    MAX_PENDING = 64  # token counts kept between two backwards (more is cleared, not kept)

    def __init__(self) -> None:
        self.current: tuple[int, int] | None = None
        self.pending: dict[int, tuple[int, int] | None] = {}
        self.backward_ran = False  # since the last forward
        self.mark_next = False  # the next block output of this forward gets the backward hook

    def __call__(self, module, args, output) -> None:
        grid = _embedding_grid(module, args, output)
        if torch.compiler.is_compiling():  # compiled backwards recompute with the traced grid
            self.current = grid
            return
        if _in_backward():  # the embedding itself recomputed: its blocks use `pending`
            return
        self.current = grid
        if grid is None or not torch.is_grad_enabled():
            return  # no backward will recompute this forward
        if self.backward_ran or len(self.pending) >= self.MAX_PENDING:
            self.pending.clear()
            self.backward_ran = False
        n = grid[0] * grid[1]
        self.pending[n] = grid if self.pending.get(n, grid) == grid else None
        self.mark_next = True

    def grid_of(self, n_patches: int) -> tuple[int, int] | None:
        """The grid of ``n_patches`` tokens in this forward or recomputation, or None."""
        if not torch.compiler.is_compiling() and _in_backward():
            self.backward_ran = True
            return self.pending.get(n_patches)
        cur = self.current
        return cur if cur is not None and cur[0] * cur[1] == n_patches else None

    def mark(self, out: torch.Tensor) -> None:
        """Hook the first adapted output of this forward, to notice its backward."""
        if self.mark_next and out.requires_grad and not torch.compiler.is_compiling():
            self.mark_next = False
            out.register_hook(self._backward_reached)

    def _backward_reached(self, grad: torch.Tensor) -> None:
        self.backward_ran = True


def _embedding_grid(module, args, output) -> tuple[int, int] | None:
    if not isinstance(output, torch.Tensor):
        return None
    if output.dim() == 4:
        if getattr(module, "output_fmt", "NHWC") == "NCHW":  # timm's Format is a str enum
            return output.shape[2], output.shape[3]
        return output.shape[1], output.shape[2]
    feat = getattr(module, "dynamic_feat_size", None)
    if callable(feat) and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        h, w = feat((args[0].shape[-2], args[0].shape[-1]))
        return h, w
    grid = getattr(module, "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def _in_backward() -> bool:
    """Is autograd running a backward now (where checkpointed blocks are recomputed)?"""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class _VitTokens(_TokenGrid):
    """A ViT block's tokens: the grid is the patch embedding's (see :class:`_PatchGrid`), else,
    for blocks run without it, the model's ``grid_size`` when the count matches. Never a guess."""

    def __init__(self, num_prefix_tokens: int, grid_size: tuple[int, int],
                 patch_grid: _PatchGrid) -> None:
        super().__init__(num_prefix_tokens, grid_size)
        self.patch_grid = patch_grid

    def apply(self, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = super().apply(adapter, x)
        self.patch_grid.mark(out)
        return out

    def grid(self, n_patches: int) -> tuple[int, int]:
        grid = self.patch_grid.grid_of(n_patches)
        if grid is not None:
            return grid
        made = self.patch_grid.current
        if made is None and self.grid_size[0] * self.grid_size[1] == n_patches:
            return self.grid_size  # blocks run before any forward of the patch embedding
        made = f"a {made[0]}x{made[1]} grid" if made is not None else "no grid yet"
        raise ValueError(
            f"MSLoRA: a ViT block got {n_patches} patch tokens, and their (H, W) grid is not "
            f"known (the patch embedding made {made} in the latest forward). MSLoRA needs every "
            "patch token on its grid: token dropping (timm's patch_drop_rate) cannot be combined "
            "with it, and under activation checkpointing, forwards at two grids with the same "
            "token count (such as 16x12 and 12x16) cannot share one backward."
        )


class _AdapterHook:
    """Applies ``adapter`` to one tensor, directly or through a token grid."""

    def __init__(self, adapter: MSLoRA, tokens: _TokenGrid | None) -> None:
        self.adapter = adapter
        self.tokens = tokens

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            return self.adapter(x)
        return self.tokens.apply(self.adapter, x)


class _OutputHook(_AdapterHook):
    """A forward hook: the adapter transforms the module's output."""

    def __call__(self, module, args, output):
        return self.apply(output)


class _InputHook(_AdapterHook):
    """A forward pre-hook: the adapter transforms the module's (first) input."""

    def __call__(self, module, args):
        return (self.apply(args[0]), *args[1:])


# --------------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------------
@dataclass
class _Site:
    name: str  # the module reported as adapted
    owner: nn.Module  # the module the adapter is registered on, as `mslora`
    hooked: nn.Module  # the module whose output (or input) the adapter transforms
    on_input: bool
    channels: int
    data_format: str  # the MSLoRA module's layout: channels_first or channels_last
    prenorm: bool
    tokens: _TokenGrid | None = None

    def build(self, cfg: MSLoRAConfig) -> MSLoRA:
        if hasattr(self.owner, ADAPTER_NAME):
            raise ValueError(
                f"inject: {self.name or type(self.owner).__name__} already has an attribute "
                f"{ADAPTER_NAME!r} (an adapter injected before?)"
            )
        try:
            adapter = MSLoRA(self.channels, cfg.rank, cfg.groups, cfg.kernel_sizes, self.prenorm,
                             cfg.enhance, cfg.pool, cfg.gate, cfg.shuffle, self.data_format,
                             cfg.backend)
        except ValueError as e:
            raise ValueError(f"inject: cannot place MSLoRA at {self.name!r}: {e}") from None
        ref = next(self.hooked.parameters(), None)
        if ref is None:
            ref = next(self.owner.parameters(), None)
        if ref is not None:
            adapter.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        return adapter

    def attach(self, adapter: MSLoRA) -> None:
        self.owner.add_module(ADAPTER_NAME, adapter)
        if self.on_input:
            self.hooked.register_forward_pre_hook(_InputHook(adapter, self.tokens))
        else:
            self.hooked.register_forward_hook(_OutputHook(adapter, self.tokens))


def _layer_norm_width(block: nn.Module, name: str) -> int:
    for attr in ("norm1", "ln_1"):  # timm's and torchvision's Swin; torchvision's ViT
        norm = getattr(block, attr, None)
        if isinstance(norm, nn.LayerNorm):
            return int(norm.normalized_shape[-1])
    if isinstance(getattr(block, "dim", None), int):
        return block.dim
    raise ValueError(
        f"inject: cannot tell the channel count of block {name!r} (no norm1 or ln_1 LayerNorm)"
    )


def _auto_sites(model: nn.Module, cfg: MSLoRAConfig) -> tuple[list[_Site], list]:
    """The sites, and the (patch_embed, _PatchGrid) hooks their ViTs need."""
    sites: list[_Site] = []
    grid_hooks: list[tuple[nn.Module, _PatchGrid]] = []
    transformer_prenorm = True if cfg.prenorm is None else cfg.prenorm
    cnn_prenorm = False if cfg.prenorm is None else cfg.prenorm
    vit_blocks: dict[int, _TokenGrid] = {}
    for m in model.modules():
        if _is_vit(m):
            grid = tuple(int(v) for v in m.patch_embed.grid_size)
            tokens = _VitTokens(int(m.num_prefix_tokens), grid, _PatchGrid())
            grid_hooks.append((m.patch_embed, tokens.patch_grid))
            for blk in m.blocks:
                vit_blocks[id(blk)] = tokens
        elif _is_torchvision_vit(m):
            # A fixed, square image_size (torchvision asserts it), so a fixed grid; one class
            # token in front.
            side = int(m.image_size) // int(m.patch_size)
            tokens = _TokenGrid(1 if hasattr(m, "class_token") else 0, (side, side))
            for blk in m.encoder.layers:
                vit_blocks[id(blk)] = tokens
    for name, m in model.named_modules():
        cls = type(m).__name__
        if id(m) in vit_blocks:
            sites.append(_Site(name, m, m, False, _layer_norm_width(m, name), "channels_last",
                               transformer_prenorm, vit_blocks[id(m)]))
        elif cls in RESNET_BLOCKS and isinstance(getattr(m, "conv2", None), nn.Conv2d):
            nxt = getattr(m, RESNET_BLOCKS[cls], None)
            if not isinstance(nxt, nn.Conv2d):
                continue
            sites.append(_Site(name, m, nxt, True, nxt.in_channels, "channels_first", cnn_prenorm))
        elif cls in SWIN_BLOCKS and hasattr(m, "mlp") and hasattr(m, "attn"):
            c = _layer_norm_width(m, name)
            res = getattr(m, "input_resolution", None)
            # Old timm blocks take and return (N, H*W, C); current timm and torchvision
            # blocks (N, H, W, C).
            # The token path is taken only for 3-D outputs, at run time.
            tokens = _SwinTokens(tuple(int(v) for v in res)) if res is not None else None
            sites.append(_Site(name, m, m, False, c, "channels_last", transformer_prenorm, tokens))
    return sites, grid_hooks


class _SwinTokens(_TokenGrid):
    """Swin output: (N, H, W, C) passes straight to the adapter; (N, H*W, C) goes via the grid."""

    def __init__(self, grid_size: tuple[int, int]) -> None:
        super().__init__(0, grid_size)

    def apply(self, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return adapter(x) if x.dim() == 4 else super().apply(adapter, x)


def _is_vit(m: nn.Module) -> bool:
    return (
        isinstance(getattr(m, "blocks", None), (nn.Sequential, nn.ModuleList))
        and isinstance(getattr(m, "num_prefix_tokens", None), int)
        and hasattr(getattr(m, "patch_embed", None), "grid_size")
    )


def _is_torchvision_vit(m: nn.Module) -> bool:
    """torchvision's VisionTransformer: conv_proj, encoder.layers, image_size and patch_size."""
    layers = getattr(getattr(m, "encoder", None), "layers", None)
    return (
        isinstance(getattr(m, "conv_proj", None), nn.Conv2d)
        and isinstance(layers, (nn.Sequential, nn.ModuleList))
        and isinstance(getattr(m, "image_size", None), int)
        and isinstance(getattr(m, "patch_size", None), int)
    )


def _output_channels(m: nn.Module, name: str) -> int:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    if isinstance(getattr(m, "norm1", None), nn.LayerNorm):  # a transformer block
        return int(m.norm1.normalized_shape[-1])
    for attr in ("out_channels", "out_features", "num_features", "dim", "embed_dim"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise ValueError(
        f"inject: cannot tell the output channel count of {name!r} ({type(m).__name__}); "
        "target a Conv, Linear or norm layer, or a module with an `out_channels` attribute"
    )


def _target_sites(model: nn.Module, cfg: MSLoRAConfig) -> list[_Site]:
    prenorm = False if cfg.prenorm is None else cfg.prenorm
    sites = []
    for name, m in model.named_modules():
        if not name or not matches_target(name, cfg.targets):
            continue
        if isinstance(m, MSLoRA) or ADAPTER_NAME in name.split("."):
            continue
        c = _output_channels(m, name)
        if cfg.data_format == "tokens":
            sites.append(_Site(name, m, m, False, c, "channels_last", prenorm,
                               _TokenGrid(cfg.num_prefix_tokens, cfg.grid_size)))
        else:
            sites.append(_Site(name, m, m, False, c, cfg.data_format, prenorm))
    return sites
