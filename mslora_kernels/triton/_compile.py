"""The description of one kernel configuration, shared by launchers and the compile check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# FP fusion (FMA contraction: a * b + c in one instruction, rounded once), pinned at every launch
# and in the compile check: Triton's default up to 3.9, which warns (once per process) that 3.10
# turns it off. Pinned, every Triton version compiles the kernels the same. (Under torch.compile,
# Inductor compiles them with its own options instead.)
FP_FUSION = True
# The ranks whose configurations the kernel modules' compile_cases() list: 128 (the default) and
# 32, which stands for every D from 17 to 32 (the tile shapes follow next_power_of_2(D); D is a
# runtime argument), the tests' odd D = 24 among them.
COMPILE_RANKS = (32, 128)


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

    def __post_init__(self):
        # ASTSource reads the signature in argument order in some Triton versions (3.3) and by
        # name in others (3.6): keep it in the kernel's argument order, and name any mismatch.
        names = getattr(self.fn, "arg_names", None)
        if names is None:
            return
        missing = [n for n in names if n not in self.signature]
        extra = [n for n in self.signature if n not in names]
        if missing or extra:
            raise ValueError(f"{self.name}: the signature does not match the kernel's arguments "
                             f"(missing {missing}, unknown {extra})")
        object.__setattr__(self, "signature", {n: self.signature[n] for n in names})

    def options(self) -> dict:
        """The launch options ``triton.compile`` takes for this case."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages,
                "enable_fp_fusion": FP_FUSION}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts

    def attrs(self) -> dict:
        """The ``tt.divisibility`` attributes ``ASTSource`` takes, keyed by argument index."""
        return {(self.fn.arg_names.index(n),): [["tt.divisibility", 16]]
                for n in self.divisible_by_16}


# The rank whose configurations the MSLoRA kernel modules also list as Triton's launcher compiles
# them for aligned inputs (``aligned``): the default rank, run with the usual widths.
ALIGNED_RANK = 128
# Integer arguments that are multiples of 16 in that case: C and D, their per-group parts (C % 16G
# == 0, G | 8), and the fp32 gradient buffer's section offsets and row stride (multiples of 32).
ALIGNED_INTS = ("C", "D", "Cg", "Dg", "CG", "DG", "gstride")


def aligned(case: CompileCase) -> CompileCase:
    """``case`` as Triton's launcher compiles it for 16-byte aligned tensors, D % 16 == 0 and
    C % (16 G) == 0 (D = 128 with C = 64..1024 and G = 4, in any layout): it specialises every
    pointer and integer argument divisible by 16 (``divisible_by_16``), which lets loads
    vectorise and changes registers and spills. Strides stay generic here (at run time a stride
    of 1 is specialised too, and others by their divisibility, per layout and map size); the
    unaligned case itself runs for any other D or C, or a misaligned view."""
    div = tuple(n for n, t in case.signature.items()
                if t.startswith("*") or n in ALIGNED_INTS or n.startswith("o_"))
    return dataclasses.replace(case, name=case.name[:-1] + ",a16]", divisible_by_16=div)
