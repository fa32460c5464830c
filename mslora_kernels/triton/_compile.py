"""The description of one kernel configuration, shared by launchers and the compile check."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class CompileCase:
    """One (kernel, signature, constexprs, launch options) combination a launcher can pick.

    ``signature`` maps every argument name to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``) or ``"constexpr"``; ``constexprs`` gives the constexpr values.
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
