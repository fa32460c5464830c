"""Placing adapters into existing models, freezing the backbone, adapter checkpoints.

``inject(model, config)`` is the one entry point for every adapter config (MSLoRA, Serial LoRA,
MSPLoRA). Each config class implements the placement itself, as ``config._inject(model) ->
list[str]`` (the names of the modules it adapted); this module owns what is common: target
matching, freezing, and the refusal of a model in which nothing was adapted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn


def matches_target(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's ``target_modules`` rule.

    A string is a regular expression that must match the full module name; a list holds
    module-name suffixes: ``name`` matches when it equals one, or ends with ``"." + suffix``.
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model: nn.Module, config) -> nn.Module:
    """Place the adapters ``config`` describes into ``model`` in place, freeze the rest, return it."""
    adapted = config._inject(model)
    if not adapted:
        raise ValueError(
            f"inject: found nothing to adapt in {type(model).__name__} with {config!r}; "
            "name the modules to adapt in the config's `targets`"
        )
    return model
