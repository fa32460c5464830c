"""Serial LoRA and MSPLoRA (SPEC sections 2 and 3): reference math, modules, configs, merging.

Layers, top to bottom:
- the reference functions (:func:`serial_lora_reference`, :func:`msplora_reference` and the merged
  weights), written straight from SPEC's equations: the source of truth for tests and benchmarks;
- :class:`LoRAPair`, one (A, B) pair; :class:`SerialLoRALinear` and :class:`MSPLoRALinear`, the
  wrappers that replace a frozen ``nn.Linear`` (forward -> reference or the fused op
  :func:`mslora_kernels.lora_ops.lora_linear`);
- :class:`SerialLoRAConfig` and :class:`MSPLoRAConfig`, whose ``_inject(model)`` places them for
  :func:`mslora_kernels.inject.inject`;
- :func:`merge` / :func:`unmerge` and the LoRA+ helper :func:`loraplus_param_groups`.

Shared pairs (Serial LoRA's pair shared by sibling q, k, v Linears; MSPLoRA's global and mid
pairs) are registered once, in the first wrapper that uses them (so a checkpoint holds each
once); the other wrappers keep a plain reference to the same module.

Every wrapper also exposes ``weight`` and ``bias``: the effective (adapted) weight, differentiable
in the adapter. Attention modules that read ``self.qkv.weight`` instead of calling
``self.qkv(x)`` -- torchvision's ``ShiftedWindowAttention`` does -- therefore see the adapted
projection too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backends import func_transform_error, in_func_transform, triton_unavailable_reason
from .inject import matches_target

LORA_BACKENDS = ("auto", "reference", "triton")
# "auto" targets: the attention's fused qkv Linear of timm ViT / Swin and torchvision Swin blocks
# (blocks.{i}.attn.qkv, layers.{s}.blocks.{i}.attn.qkv, features.{s}.{i}.attn.qkv).
AUTO_TARGETS = ("attn.qkv",)


# --------------------------------------------------------------------------------------------
# Reference math (SPEC sections 2 and 3)
# --------------------------------------------------------------------------------------------

def serial_lora_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``(x + s (x A^T) B^T) W^T + bias``; A: (r, d), B: (d, r), W: (out, d)."""
    x_t = x + scale * F.linear(F.linear(x, a), b)
    return F.linear(x_t, weight, bias)


def msplora_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      scales: Sequence[float]) -> torch.Tensor:
    """``x W^T + bias + sum_level s_level (x A_level^T) B_level^T``."""
    y = F.linear(x, weight, bias)
    for (a, b), s in zip(pairs, scales, strict=True):
        y = y + s * F.linear(F.linear(x, a), b)
    return y


def serial_merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """``W (I + s B A)`` = ``W + s (W B) A``."""
    return weight + scale * (weight @ b) @ a


def serial_unmerged_weight(merged: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Invert :func:`serial_merged_weight` with Woodbury: ``W = W' - s W' B (I + s A B)^-1 A``."""
    r = a.shape[0]
    core = torch.eye(r, dtype=a.dtype, device=a.device) + scale * (a @ b)
    return merged - scale * (merged @ b) @ torch.linalg.solve(core, a)


def msplora_merged_weight(weight: torch.Tensor, pairs, scales) -> torch.Tensor:
    """``W + sum_level s_level B_level A_level``."""
    for (a, b), s in zip(pairs, scales, strict=True):
        weight = weight + s * (b @ a)
    return weight


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

class LoRAPair(nn.Module):
    """One low-rank pair: ``A`` (rank, in_features), kaiming-uniform(a=sqrt(5)); ``B``
    (out_features, rank), zeros, so that a new adapter changes nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def extra_repr(self) -> str:
        return f"in={self.A.shape[1]}, out={self.B.shape[0]}, rank={self.rank}"


def validate_lora_backend(backend: str) -> None:
    if backend not in LORA_BACKENDS:
        raise ValueError(f"unknown LoRA backend {backend!r}; expected one of {LORA_BACKENDS} "
                         "(there are no CUDA C++ kernels for the LoRA adapters)")


# Fixed for the life of the process, like backends.fused_unavailable_reason: torch.compile
# evaluates it once while tracing. Traced, importlib's find_spec inside it is a graph break in
# torch 2.11, which fails ``fullgraph=True``.
@torch.compiler.assume_constant_result
def _fused_unavailable_reason(device: torch.device, rank: int) -> str | None:
    from .lora_ops import lora_linear_unavailable_reason  # late: imports triton

    return triton_unavailable_reason(device) or lora_linear_unavailable_reason(rank)


def resolve_lora_backend(backend: str, device: torch.device, rank: int,
                         transformed: bool = False) -> str:
    """``"reference"`` or ``"triton"`` for a call on ``device`` with a concatenated ``rank``;
    ``transformed``: inside a torch.func transform, where only the reference runs (see
    mslora_kernels.backends)."""
    validate_lora_backend(backend)
    if backend == "reference":
        return backend
    reason = _fused_unavailable_reason(device, rank)
    if backend == "auto":
        usable = device.type == "cuda" and reason is None and not transformed
        return "triton" if usable else "reference"
    if reason is not None:
        raise RuntimeError(f"LoRA backend='triton' cannot run here: {reason}")
    if transformed:
        raise func_transform_error("LoRA backend='triton'")
    return backend


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _check_linear_input(x, base: nn.Linear, cls: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{cls}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{cls}: input must be floating point, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != base.in_features:
        raise ValueError(f"{cls}: input of shape {tuple(x.shape)} does not end in "
                         f"in_features={base.in_features}")
    if x.device != base.weight.device:
        raise ValueError(f"{cls}: input is on {x.device} but the weights are on "
                         f"{base.weight.device}")


class _AdaptedLinear(nn.Module):
    """What both wrappers share: the frozen ``base`` Linear, pairs owned or referenced, merging."""

    def __init__(self, base: nn.Linear, backend: str) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        validate_lora_backend(backend)
        self.base = base
        self.backend = backend
        self.merged = False

    def _attach(self, name: str, pair: LoRAPair, own: bool) -> None:
        if own:
            self.add_module(name, pair)
        else:  # a plain reference: the owner registers it (once in state_dict and parameters)
            object.__setattr__(self, "_shared_" + name, pair)

    def _pair(self, name: str) -> LoRAPair:
        return self._modules[name] if name in self._modules else self.__dict__["_shared_" + name]

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (differentiable in the adapter); the base weight once merged."""
        w = self.base.weight
        return w if self.merged else self._merged_weight(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_linear_input(x, self.base, type(self).__name__)
        if self.merged:
            return self.base(x)
        dtype = _compute_dtype(x)
        x = _cast(x, dtype)
        with torch.autocast(x.device.type, enabled=False):
            return self._adapted(x, dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base.weight
            self.base.weight.copy_(self._merged_weight(w.double()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base.weight
            self.base.weight.copy_(self._unmerged_weight(w.double()).to(w.dtype))
            self.merged = False


class SerialLoRALinear(_AdaptedLinear):
    """A frozen Linear whose input goes through Serial LoRA's ``x + s (x A^T) B^T`` first.

    The pair may be shared with sibling Linears (separate q, k, v projections of one attention):
    ``own`` says whether this wrapper registers it.
    """

    def __init__(self, base: nn.Linear, pair: LoRAPair, scale: float, backend: str = "auto",
                 own: bool = True) -> None:
        super().__init__(base, backend)
        if pair.A.shape[1] != base.in_features or pair.B.shape[0] != base.in_features:
            raise ValueError(f"SerialLoRALinear: the pair is for {pair.A.shape[1]} features, the "
                             f"Linear takes {base.in_features}")
        self.scale = float(scale)
        self._attach("serial_lora", pair, own)

    @property
    def pair(self) -> LoRAPair:
        return self._pair("serial_lora")

    def _merged_weight(self, w):
        p = self.pair
        return serial_merged_weight(w, p.A.to(w.dtype), p.B.to(w.dtype), self.scale)

    def _unmerged_weight(self, w):
        p = self.pair
        return serial_unmerged_weight(w, p.A.to(w.dtype), p.B.to(w.dtype), self.scale)

    def _adapted(self, x, dtype):
        p = self.pair
        w, bias, a, b = (_cast(t, dtype) for t in (self.base.weight, self.base.bias, p.A, p.B))
        transformed = in_func_transform(x, w, bias, a, b)
        if resolve_lora_backend(self.backend, x.device, p.rank, transformed) == "reference":
            return serial_lora_reference(x, w, bias, a, b, self.scale)
        from .lora_ops import lora_linear

        # The fused prologue: V = s W B (out x r), so that y = x W^T + b + (x A^T) V^T.
        return lora_linear(x, w, bias, a, self.scale * (w @ b))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, backend={self.backend!r}, merged={self.merged}"


MSP_LEVELS = ("msp_global", "msp_mid", "msp_layer")


class MSPLoRALinear(_AdaptedLinear):
    """A frozen Linear plus MSPLoRA's three levels: ``y = x W^T + b + sum s_l (x A_l^T) B_l^T``.

    ``pairs`` holds (pair, scale, own) for the global, mid and layer-specific levels in that
    order; a level whose rank is 0 is absent.
    """

    def __init__(self, base: nn.Linear, pairs: Sequence[tuple[str, LoRAPair, float, bool]],
                 backend: str = "auto") -> None:
        super().__init__(base, backend)
        self.levels = []
        self.scales = []
        for name, pair, scale, own in pairs:
            if name not in MSP_LEVELS:
                raise ValueError(f"MSPLoRALinear: unknown level {name!r}")
            if pair.A.shape[1] != base.in_features or pair.B.shape[0] != base.out_features:
                raise ValueError(f"MSPLoRALinear: {name} is a ({pair.B.shape[0]} x "
                                 f"{pair.A.shape[1]}) update, the Linear is "
                                 f"({base.out_features} x {base.in_features})")
            self._attach(name, pair, own)
            self.levels.append(name)
            self.scales.append(float(scale))

    def pairs(self) -> list[LoRAPair]:
        return [self._pair(n) for n in self.levels]

    def _merged_weight(self, w):
        return msplora_merged_weight(
            w, [(p.A.to(w.dtype), p.B.to(w.dtype)) for p in self.pairs()], self.scales)

    def _unmerged_weight(self, w):
        return msplora_merged_weight(
            w, [(p.A.to(w.dtype), p.B.to(w.dtype)) for p in self.pairs()],
            [-s for s in self.scales])

    def _adapted(self, x, dtype):
        ps = self.pairs()
        w, bias = _cast(self.base.weight, dtype), _cast(self.base.bias, dtype)
        ab = [(_cast(p.A, dtype), _cast(p.B, dtype)) for p in ps]
        rank = sum(p.rank for p in ps)
        transformed = in_func_transform(x, w, bias, *(t for pair in ab for t in pair))
        if resolve_lora_backend(self.backend, x.device, rank, transformed) == "reference":
            return msplora_reference(x, w, bias, ab, self.scales)
        from .lora_ops import lora_linear

        # The three levels as one concatenated-rank update in the base projection's kernel.
        a = torch.cat([a for a, _ in ab], dim=0)
        v = torch.cat([s * b for (_, b), s in zip(ab, self.scales, strict=True)], dim=1)
        return lora_linear(x, w, bias, a, v)

    def extra_repr(self) -> str:
        lv = ", ".join(f"{n}: r={p.rank} s={s:g}"
                       for n, p, s in zip(self.levels, self.pairs(), self.scales, strict=True))
        return f"{lv}, backend={self.backend!r}, merged={self.merged}"


# --------------------------------------------------------------------------------------------
# Configs: placement for mslora_kernels.inject.inject
# --------------------------------------------------------------------------------------------

def _check_positive_int(cls: str, name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{cls}: {name} must be {kind} integer, got {value!r}")


def _check_common(cls: str, alpha, targets, backend) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{cls}: alpha must be a positive number, got {alpha!r}")
    if not isinstance(targets, str) and not (
            isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets)):
        raise TypeError(f"{cls}: targets must be 'auto', a regular expression or a non-empty "
                        f"list of module-name suffixes, got {targets!r}")
    validate_lora_backend(backend)


def _target_linears(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """The Linears ``targets`` names (``"auto"``: attention qkv), not already adapted."""
    rule = list(AUTO_TARGETS) if targets == "auto" else targets
    adapted = {n for n, m in model.named_modules() if isinstance(m, _AdaptedLinear)}
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and matches_target(n, rule)
            and not any(n.startswith(a + ".") for a in adapted)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _adapter_dtype(w: torch.Tensor) -> torch.dtype:
    # Adapters train in float32 even on a half-precision backbone (PEFT's default too).
    return torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


@dataclass(frozen=True)
class SerialLoRAConfig:
    """Serial LoRA (SPEC section 2): one shared pair per attention, before its q, k, v.

    Args:
        rank: r. alpha: s = alpha / r.
        targets: ``"auto"`` (every ``attn.qkv`` Linear: timm ViT / Swin, torchvision Swin), a
            regular expression over full module names, or a list of name suffixes (PEFT's rule).
            Linears matched under one parent module with the same in_features (separate q, k, v
            projections) share one pair; each other match gets its own.
        backend: ``"auto"`` (fused Triton on CUDA, the reference elsewhere), ``"reference"`` or
            ``"triton"``.
    """

    rank: int = 8
    alpha: float = 8
    targets: str | Sequence[str] = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_positive_int("SerialLoRAConfig", "rank", self.rank)
        _check_common("SerialLoRAConfig", self.alpha, self.targets, self.backend)
        if not isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _inject(self, model: nn.Module) -> list[str]:
        """Wrap every targeted Linear; freeze everything else. Returns the wrapped names."""
        found = _target_linears(model, self.targets)
        groups: dict[tuple[str, int], list[tuple[str, nn.Linear]]] = {}
        for name, lin in found:
            groups.setdefault((name.rpartition(".")[0], lin.in_features), []).append((name, lin))
        _freeze(model)
        for (_, d), members in groups.items():
            w = members[0][1].weight
            pair = LoRAPair(d, d, self.rank, device=w.device, dtype=_adapter_dtype(w))
            for i, (name, lin) in enumerate(members):
                _replace(model, name, SerialLoRALinear(lin, pair, self.scale, self.backend,
                                                       own=i == 0))
        return [n for n, _ in found]


def layer_index(name: str) -> tuple[int, ...]:
    """A layer's position in the repeated structure: every integer component of its name, in
    order (``layers.2.blocks.10.attn.qkv`` -> (2, 10)), compared numerically."""
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def layer_type(name: str) -> str:
    """The repeated structure a layer belongs to: its name with every index replaced by ``*``."""
    return ".".join("*" if p.isdigit() else p for p in name.split("."))


def mid_groups(n_layers: int, n_mid: int) -> list[int]:
    """The mid-level group of each of ``n_layers`` ordered layers: ``min(n_mid, L)`` contiguous
    groups whose sizes differ by at most one (the larger ones first)."""
    n = min(n_mid, n_layers)
    q, rem = divmod(n_layers, n)
    out = []
    for g in range(n):
        out += [g] * (q + (1 if g < rem else 0))
    return out


@dataclass(frozen=True)
class MSPLoRAConfig:
    """MSPLoRA (SPEC section 3): global, mid-level and layer-specific LoRA on repeated Linears.

    Args:
        ranks: (global, mid, layer) ranks; 0 drops that level.
        alpha: s_level = alpha / r_level for every level.
        n_mid: the number of contiguous mid-level groups.
        targets: as :class:`SerialLoRAConfig` (``"auto"``: every ``attn.qkv``).
        backend: as :class:`SerialLoRAConfig`.

    Layers of one type share the global pair: a type is the name with its indices replaced
    (``layers.*.blocks.*.attn.qkv``) together with the Linear's (in, out) features, since only
    equal shapes can share a pair (Swin's stages, of different widths, are separate types).
    Within a type the layers are ordered by their indices as numbers, all of them
    ((stage, block) for Swin), and split into ``n_mid`` contiguous groups in that order.
    """

    ranks: tuple[int, int, int] = (8, 4, 2)
    alpha: float = 16
    n_mid: int = 3
    targets: str | Sequence[str] = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        cls = "MSPLoRAConfig"
        if isinstance(self.ranks, (str, bytes)) or len(tuple(self.ranks)) != 3:
            raise ValueError(f"{cls}: ranks must be three integers (global, mid, layer), "
                             f"got {self.ranks!r}")
        object.__setattr__(self, "ranks", tuple(self.ranks))
        for lvl, r in zip(MSP_LEVELS, self.ranks, strict=True):
            _check_positive_int(cls, f"the {lvl[4:]} rank", r, allow_zero=True)
        if not any(self.ranks):
            raise ValueError(f"{cls}: at least one rank must be positive, got {self.ranks}")
        _check_positive_int(cls, "n_mid", self.n_mid)
        _check_common(cls, self.alpha, self.targets, self.backend)
        if not isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(self.alpha / r if r else 0.0 for r in self.ranks)

    def _inject(self, model: nn.Module) -> list[str]:
        found = _target_linears(model, self.targets)
        types: dict[tuple, list[tuple[str, nn.Linear]]] = {}
        for name, lin in found:
            key = (layer_type(name), lin.in_features, lin.out_features)
            types.setdefault(key, []).append((name, lin))
        _freeze(model)
        r_g, r_m, r_l = self.ranks
        s_g, s_m, s_l = self.scales
        for (_, d_in, d_out), members in types.items():
            members.sort(key=lambda m: layer_index(m[0]))
            w = members[0][1].weight
            new = lambda r, w=w, d_in=d_in, d_out=d_out: LoRAPair(
                d_in, d_out, r, device=w.device, dtype=_adapter_dtype(w))
            glob = new(r_g) if r_g else None
            groups = mid_groups(len(members), self.n_mid)
            mids = {}
            for i, (name, lin) in enumerate(members):
                levels = []
                if glob is not None:
                    levels.append(("msp_global", glob, s_g, i == 0))
                if r_m:
                    g = groups[i]
                    first = g not in mids
                    if first:
                        mids[g] = new(r_m)
                    levels.append(("msp_mid", mids[g], s_m, first))
                if r_l:
                    levels.append(("msp_layer", new(r_l), s_l, True))
                _replace(model, name, MSPLoRALinear(lin, levels, self.backend))
        return [n for n, _ in found]


# --------------------------------------------------------------------------------------------
# Merging and LoRA+
# --------------------------------------------------------------------------------------------

def _adapted_modules(model: nn.Module) -> list[_AdaptedLinear]:
    return [m for m in model.modules() if isinstance(m, _AdaptedLinear)]


def merge(model: nn.Module) -> nn.Module:
    """Fold every Serial LoRA / MSPLoRA update into its frozen weight (computed in float64):
    Serial ``W' = W (I + s B A)``, MSPLoRA ``W' = W + sum s B A``. Forward then runs the plain
    Linear. Returns the model."""
    for m in _adapted_modules(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (Serial LoRA through Woodbury's identity, in float64)."""
    for m in _adapted_modules(model):
        m.unmerge()
    return model


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+: every LoRA ``B`` at ``lr * ratio``, every other
    trainable parameter (the ``A``s, a task head) at ``lr``. Shared pairs appear once."""
    for n, v in (("lr", lr), ("ratio", ratio)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"loraplus_param_groups: {n} must be a positive number, got {v!r}")
    b_ids = {id(m.B) for m in model.modules() if isinstance(m, LoRAPair)}
    if not b_ids:
        raise ValueError("loraplus_param_groups: the model holds no LoRA pairs; inject first")
    rest, bs = [], []
    for p in model.parameters():  # deduplicated
        if p.requires_grad:
            (bs if id(p) in b_ids else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay},
              {"params": bs, "lr": lr * ratio, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]

