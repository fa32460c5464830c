"""Placing adapters into existing models, freezing the backbone, adapter checkpoints.

``inject(model, config)`` is the one entry point for every adapter config (MSLoRA, Serial LoRA,
MSPLoRA). Each config class implements the placement itself, as ``config._inject(model) ->
list[str]`` (the names of the modules it adapted); this module owns what is common: target
matching, freezing, and the refusal of a model in which nothing was adapted.

What a config class provides: ``_inject(model) -> list[str]``; optionally a ``trainable``
attribute (module-name patterns kept trainable); and, for :func:`save_adapter` /
:func:`load_adapter`, to be a dataclass exported from ``mslora_kernels`` (its fields are written
to JSON; ``from_dict`` is used when the class has one).

Freezing (done here, for every config): the parameters that ``_inject`` added are the adapters
and stay trainable; every parameter that existed before is frozen (``requires_grad=False``),
except those of modules named in ``config.trainable`` and of adapters injected earlier. Frozen
BatchNorm (and InstanceNorm with running statistics) layers are pinned to eval mode: their
``train`` method is replaced, on the instance, by one that always sets eval mode, so
``model.train()`` (directly, through DDP, or from a training loop) never lets them update their
running statistics, and they normalise with the frozen statistics, as at pre-training. The
layers keep their class and state-dict keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def matches_target(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's ``target_modules`` rule.

    A string is a regular expression that must match the full module name; a list holds
    module-name suffixes: ``name`` matches when it equals one, or ends with ``"." + suffix``.
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


RECORDS_ATTR = "_adapter_records"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "mslora_kernels.adapter"
FORMAT_VERSION = 1


@dataclass
class _Record:
    """One ``inject`` call: the config, the modules it adapted and the parameters it added."""

    config: object
    adapted: list[str]
    params: list[str]  # names relative to the module `inject` was called on


def inject(model: nn.Module, config) -> nn.Module:
    """Place the adapters ``config`` describes into ``model`` in place, freeze the rest, return it.

    After the call only the adapters (and the modules named in ``config.trainable``) train;
    frozen BatchNorm layers stay in eval mode even after ``model.train()``.
    Inject before wrapping the model in ``DistributedDataParallel``, FSDP or ``torch.compile``.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            "inject: got a DistributedDataParallel/DataParallel wrapper; inject into the model "
            "first, then wrap it (the wrapper has already registered the parameters to sync)"
        )
    sharded = _sharded(model)
    if sharded:
        raise TypeError(
            f"inject: {sharded}; inject into the unsharded model first, then shard it (adapters "
            "added now would be left out of the sharding and their gradients never reduced)"
        )
    before = {id(p) for p in model.parameters()}
    adapted = config._inject(model)
    if not adapted:
        raise ValueError(
            f"inject: found nothing to adapt in {type(model).__name__} with {config!r}; "
            "name the modules to adapt in the config's `targets`"
        )
    added = [n for n, p in model.named_parameters() if id(p) not in before]
    records: list[_Record] = list(getattr(model, RECORDS_ATTR, []))
    records.append(_Record(config, list(adapted), added))
    keep = {n for r in records for n in r.params}
    patterns = [getattr(r.config, "trainable", ()) for r in records]
    freeze(model, trainable=patterns, keep=keep)
    setattr(model, RECORDS_ATTR, records)
    return model


def _fsdp1(model: nn.Module) -> str | None:
    """The first module of ``model`` wrapped in (FSDP1's) FullyShardedDataParallel, or None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, m in model.named_modules():
        if isinstance(m, FullyShardedDataParallel):
            return name or "the model"
    return None


def _sharded(model: nn.Module) -> str | None:
    """How ``model`` is already sharded for distributed training (FSDP, FSDP2, DTensor), or None."""
    fsdp1 = _fsdp1(model)
    if fsdp1:
        return f"{fsdp1} is wrapped in FullyShardedDataParallel"
    for name, p in model.named_parameters():
        if _is_dtensor(p):
            return f"parameter {name} is a DTensor (sharded, e.g. by FSDP2's fully_shard)"
    return None


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _model_name(model: nn.Module) -> str:
    """The model's class name, seen through the ``FSDP<Name>`` subclass FSDP2 gives it."""
    cls = type(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls.__name__


# --------------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------------
class _PinnedEval:
    """Replaces a frozen norm layer's ``train`` method: whatever mode is asked, set eval mode.

    A plain object holding its module (not a closure) so that ``copy.deepcopy`` and pickle carry
    it along with the layer.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def _has_running_stats(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))
        and getattr(m, "running_mean", None) is not None
    )


def _matching_modules(model: nn.Module, patterns) -> list[str]:
    """Names of the modules of ``model`` that one of ``patterns`` (each str or list) matches."""
    pats = [p for p in patterns if p]
    return [n for n, _ in model.named_modules() if n and any(matches_target(n, p) for p in pats)]


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze(model: nn.Module, trainable=(), keep=()) -> list[str]:
    """Freeze ``model`` except the parameters named in ``keep`` and the modules ``trainable`` names.

    ``trainable`` is one pattern (a regex string or a list of suffixes, as ``targets``) or a list
    of such patterns. Norm layers with running statistics outside those modules are pinned to
    eval mode (see the module docstring). Returns the names of the trainable modules.
    """
    if isinstance(trainable, str) or (
        isinstance(trainable, (list, tuple)) and all(isinstance(t, str) for t in trainable)
    ):
        trainable = [trainable]
    heads = _matching_modules(model, trainable)
    keep = set(keep)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep or _under(n, heads))
    for n, m in model.named_modules():
        if _has_running_stats(m) and not _under(n, heads):
            if not isinstance(m.__dict__.get("train"), _PinnedEval):
                m.train = _PinnedEval(m)  # an instance attribute: shadows nn.Module.train
            nn.Module.train(m, False)
    return heads


@dataclass(frozen=True)
class TrainableParameters:
    """Parameter counts of a model: ``str()`` gives PEFT's one-line summary."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Trainable and total parameter counts (shared parameters counted once).

    ``print(trainable_parameters(model))`` prints, like PEFT's ``print_trainable_parameters``,
    ``trainable params: 794,624 || all params: 26,352,656 || trainable%: 3.0154``.
    """
    params = list(_unwrap(model).parameters())
    return TrainableParameters(sum(p.numel() for p in params if p.requires_grad),
                               sum(p.numel() for p in params))


# --------------------------------------------------------------------------------------------------
# Adapter checkpoints: adapter_config.json + adapter_model.safetensors in one directory
# --------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _injected(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if getattr(m, RECORDS_ATTR, None)]


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter checkpoint holds: the adapters' parameters, the trainable modules' state."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in _injected(model):
        records = getattr(sub, RECORDS_ATTR)
        for r in records:
            for n in r.params:
                out[_join(prefix, n)] = params[_join(prefix, n)]
        for mn in _matching_modules(sub, [getattr(r.config, "trainable", ()) for r in records]):
            for k, v in sub.get_submodule(mn).state_dict(keep_vars=True).items():
                out[_join(prefix, f"{mn}.{k}")] = v
    return out


def _config_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(config).items()}
    raise TypeError(f"save_adapter: cannot serialise a {type(config).__name__} (not a dataclass)")


def _config_from(class_name: str, d: dict):
    import mslora_kernels

    cls = getattr(mslora_kernels, class_name, None)
    if cls is None:
        raise ValueError(
            f"load_adapter: the adapter uses config class {class_name!r}, which this version of "
            f"mslora_kernels ({mslora_kernels.__version__}) does not provide"
        )
    return cls.from_dict(d) if hasattr(cls, "from_dict") else cls(**d)


def _config_diff(saved, current) -> list[str]:
    if type(saved) is not type(current):
        return [f"config class: saved {type(saved).__name__}, model has {type(current).__name__}"]
    a, b = _config_dict(saved), _config_dict(current)
    return [f"{k}: saved {a[k]!r}, model has {b.get(k)!r}"
            for k in a if k != "backend" and a[k] != b.get(k)]


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapters of ``model`` (and its ``trainable`` modules) to the directory ``path``.

    ``path/adapter_config.json`` holds the configs and where they were placed;
    ``path/adapter_model.safetensors`` the weights, under the model's parameter names.
    The frozen backbone is not saved: :func:`load_adapter` puts the adapters back into a freshly
    built base model. Under FSDP2 (``fully_shard``), call it on every rank: it gathers the
    sharded weights (a collective) and rank 0 writes.
    """
    from safetensors.torch import save_file

    from . import __version__

    model = _unwrap(model)
    fsdp1 = _fsdp1(model)
    if fsdp1:
        raise TypeError(
            f"save_adapter: {fsdp1} is wrapped in FullyShardedDataParallel, whose flat parameters "
            "hide the adapters' names; shard with FSDP2's fully_shard, whose shards it gathers"
        )
    injected = _injected(model)
    if not injected:
        raise ValueError(
            f"save_adapter: {_model_name(model)} has no adapters; "
            "call inject(model, config) first"
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "base_model": _model_name(model),
        "adapters": [
            {"prefix": prefix, "config_class": type(r.config).__name__,
             "config": _config_dict(r.config), "adapted_modules": list(r.adapted)}
            for prefix, sub in injected for r in getattr(sub, RECORDS_ATTR)
        ],
    }
    state = _adapter_state(model)
    gathered = any(_is_dtensor(v) for v in state.values())
    # FSDP2's shards are gathered whole: a collective, so every rank calls save_adapter
    tensors = {k: (v.full_tensor() if _is_dtensor(v) else v).detach().to("cpu").contiguous()
               .clone() for k, v in state.items()}
    if gathered and torch.distributed.get_rank() != 0:
        return  # rank 0 writes
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})


def _name_list(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def load_adapter(model: nn.Module, path: str | os.PathLike,
                 backend: str | None = None) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` into ``model`` and return it.

    A model without adapters (a freshly built base model) gets them injected from the saved
    config first; a model that already has them must have the same config. ``backend``
    overrides the saved backend (e.g. ``"reference"`` to run a GPU-trained adapter on a CPU).
    A mismatched model or config raises ``ValueError`` naming the mismatch; a sharded model
    (FSDP, FSDP2) ``TypeError``: load into the unsharded model, then shard it.
    """
    from safetensors.torch import load_file

    model = _unwrap(model)
    sharded = _sharded(model)
    if sharded:
        raise TypeError(f"load_adapter: {sharded}; load into the unsharded model, then shard it")
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load_adapter: no {CONFIG_FILE} in {os.fspath(path)!r}")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_adapter: {cfg_path} is not a {FORMAT} v{FORMAT_VERSION} adapter "
            f"(format {meta.get('format')!r}, version {meta.get('format_version')!r})"
        )
    if meta["base_model"] != type(model).__name__:  # a sharded model was refused above
        raise ValueError(
            f"load_adapter: the adapter in {os.fspath(path)!r} was saved from a "
            f"{meta['base_model']} model, but this model is a {type(model).__name__}"
        )
    seen: dict[str, int] = {}
    for entry in meta["adapters"]:
        prefix = entry["prefix"]
        try:
            sub = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            raise ValueError(
                f"load_adapter: the adapter was injected into submodule {prefix!r}, which this "
                f"{type(model).__name__} does not have"
            ) from None
        cfg = _config_from(entry["config_class"], entry["config"])
        if backend is not None:
            cfg = dataclasses.replace(cfg, backend=backend)
        i = seen[prefix] = seen.get(prefix, -1) + 1
        records = getattr(sub, RECORDS_ATTR, [])
        if i < len(records):
            diff = _config_diff(cfg, records[i].config)
            if diff:
                raise ValueError(
                    "load_adapter: the model already has an adapter with a different config: "
                    + "; ".join(diff)
                )
        else:
            inject(sub, cfg)
            records = getattr(sub, RECORDS_ATTR)
        saved, here = set(entry["adapted_modules"]), set(records[i].adapted)
        if saved != here:
            parts = []
            if saved - here:
                parts.append(f"saved adapters at {_name_list(saved - here)} have no place here")
            if here - saved:
                parts.append(f"this model has sites {_name_list(here - saved)} that were not saved")
            raise ValueError(
                f"load_adapter: the adapter does not fit this {type(model).__name__}: "
                + "; ".join(parts)
            )
    tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    expected = _adapter_state(model)
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_name_list(missing)}")
        if unexpected:
            parts.append(f"in the file but not in the model: {_name_list(unexpected)}")
        raise ValueError("load_adapter: the saved tensors do not match: " + "; ".join(parts))
    bad = [f"{k!r}: file {tuple(t.shape)}, model {tuple(expected[k].shape)}"
           for k, t in sorted(tensors.items()) if expected[k].shape != t.shape]
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError("load_adapter: shapes differ between the file and the model: "
                         + "; ".join(bad[:5]) + more)
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)
    return model
