"""Benchmark shapes: ResNet-50's inner widths, Swin-B's stages, a detection-sized map, a tiny one.

Each preset is a list of (C, H, W) with a default batch; D, G and K come from the command line
(defaults D=128, G=4, K=(3, 5, 7): the configuration issue 3's goals are stated for).
"""

from __future__ import annotations

from dataclasses import dataclass

from mslora_kernels import backends

DEFAULT_RANK = 128
DEFAULT_GROUPS = 4
DEFAULT_KERNEL_SIZES = (3, 5, 7)
DEFAULT_BATCH = 64

LAYOUTS = backends.LAYOUTS  # the names "auto"'s ranking looks layouts up by
LAYOUT_HELP = {
    "channels_first": "data_format='channels_first', (N, C, H, W) contiguous",
    "channels_first_cl": "data_format='channels_first', (N, C, H, W) in torch.channels_last "
                         "memory format",
    "channels_last": "data_format='channels_last', (N, H, W, C) contiguous",
}


@dataclass(frozen=True)
class Preset:
    name: str
    stages: tuple[tuple[int, int, int], ...]  # (C, H, W) per stage
    batch: int
    layout: str  # the layout the model that owns these maps uses (--quick uses it)
    goals: bool  # issue 3's performance goals are stated for this preset


PRESETS = {
    "resnet50": Preset("resnet50", ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)),
                       DEFAULT_BATCH, "channels_first", True),
    "swin_b": Preset("swin_b", ((128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7)),
                     DEFAULT_BATCH, "channels_last", True),
    "detection": Preset("detection", ((64, 200, 336),), 2, "channels_first", False),
}

# CPU smoke runs: deliberately odd sizes (PREAMBLE's N=2, C=40, H=13, W=9, D=24, G=4).
TINY = Preset("tiny", ((40, 13, 9),), 2, "channels_first", False)
TINY_RANK = 24

# --quick: one shape per preset. ResNet-50's first stage (the FMA-bound extreme, in both
# channels-first memory formats), Swin-B's third stage (18 of its 24 blocks, channels-last, as Swin
# runs it), and the detection map.
QUICK = (("resnet50", 1, ("channels_first", "channels_first_cl")),
         ("swin_b", 3, ("channels_last",)),
         ("detection", 1, ("channels_first",)))


@dataclass(frozen=True)
class Shape:
    preset: str
    stage: int  # 1-based
    n: int
    c: int
    h: int
    w: int

    @property
    def label(self) -> str:
        return f"{self.c}@{self.h}x{self.w}"

    @property
    def long_label(self) -> str:
        return f"{self.preset} s{self.stage} N={self.n} {self.label}"


def shapes_of(preset: Preset, stages=None, batch: int | None = None) -> list[Shape]:
    """The shapes of ``preset`` (all stages, or the 1-based ``stages``), at ``batch`` if given.

    The detection preset keeps its own batch of 2 unless ``batch`` is given explicitly.
    """
    chosen = range(1, len(preset.stages) + 1) if not stages else stages
    out = []
    for s in chosen:
        if not 1 <= s <= len(preset.stages):
            raise ValueError(f"preset {preset.name!r} has stages 1..{len(preset.stages)}, not {s}")
        c, h, w = preset.stages[s - 1]
        out.append(Shape(preset.name, s, batch or preset.batch, c, h, w))
    return out
