"""The description of one kernel configuration, shared by launchers and the compile check."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class CompileCase:
    """One (kernel, signature, constexprs, launch options) combination a launcher can pick.

    ``signature`` maps every argument name to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``) or ``"constexpr"``; ``constexprs`` gives the constexpr values. ``divisible_by_16``
    names the arguments (pointers, sizes, strides) that the runtime would see as multiples of 16,
    as Triton's launcher specialises them: without it, loads cannot vectorise or pipeline.
    ``maxnreg``, when set, is passed like the launcher passes it (Triton's ``maxnreg`` option).
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: tuple = ()
    maxnreg: int | None = None  # ptxas register cap per thread (None: ptxas chooses)

    def options(self) -> dict:
        """The launch options ``triton.compile`` takes for this case."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts

    def attrs(self) -> dict:
        """The ``tt.divisibility`` attributes ``ASTSource`` takes, keyed by argument index."""
        return {(self.fn.arg_names.index(n),): [["tt.divisibility", 16]]
                for n in self.divisible_by_16}
