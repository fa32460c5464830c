"""Roofline floors of one MSLoRA call and issue 3's performance goals, as plain arithmetic.

Bytes that must move (DESIGN.md, "Where the bytes go"), per call, in the benchmark dtype:
- forward: read x once, write out once, read the weights:      (2*N*C*H*W + P) * e
- backward: read x and d = dL/dout, write dx, read the weights
  and write their gradients:                                    (3*N*C*H*W + 2*P) * e
- forward+backward: the sum of the two.
P is the module's parameter count, e the element size.

Depthwise FMAs (on CUDA cores; the 1x1 products belong on tensor cores and are left out):
- forward: sum(k*k for k in K) * D * N * H * W  (83 * D * N * H * W for K = (3, 5, 7));
- backward: twice that (the input gradient, a correlation with the flipped taps, and the weight
  gradient); recomputing the forward taps instead of saving them is a choice, not a floor;
- forward+backward: three times.

A floor is a count over a rate measured in the same run: bytes over the device-to-device copy
bandwidth, FMAs over the FMA rate of an FMA-bound elementwise kernel (see ``measure``).
"""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd+bwd")
_BYTE_TERMS = {  # (activation tensors of N*C*H*W elements, weight-sized tensors) per mode
    "fwd": (2, 1),
    "bwd": (3, 2),
    "fwd+bwd": (5, 3),
}
_FMA_FACTOR = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def param_count(c: int, d: int, g: int, kernel_sizes) -> int:
    """Parameters of one MSLoRA module without options: 3*C*D/G + D*D + sum(k*k)*D (SPEC Eq. 3)."""
    return 3 * c * d // g + d * d + sum(k * k for k in kernel_sizes) * d


def min_bytes(mode: str, n: int, c: int, h: int, w: int, d: int, g: int, kernel_sizes,
              elem_size: int) -> int:
    """The bytes one call of ``mode`` must move at least (module docstring)."""
    acts, wts = _BYTE_TERMS[mode]
    return (acts * n * c * h * w + wts * param_count(c, d, g, kernel_sizes)) * elem_size


def depthwise_fmas(mode: str, n: int, h: int, w: int, d: int, kernel_sizes) -> int:
    """Depthwise multiply-adds of one call of ``mode`` (module docstring)."""
    return _FMA_FACTOR[mode] * sum(k * k for k in kernel_sizes) * d * n * h * w


def floors(mode: str, n, c, h, w, d, g, kernel_sizes, elem_size: int,
           copy_bytes_per_s: float | None, fma_per_s: float | None) -> dict:
    """Both floors in milliseconds, the larger one, and which bound it is.

    A rate that could not be measured (None) leaves its floor as None; the larger floor is then
    the other one.
    """
    nbytes = min_bytes(mode, n, c, h, w, d, g, kernel_sizes, elem_size)
    fmas = depthwise_fmas(mode, n, h, w, d, kernel_sizes)
    mem_ms = nbytes / copy_bytes_per_s * 1e3 if copy_bytes_per_s else None
    fma_ms = fmas / fma_per_s * 1e3 if fma_per_s else None
    cands = [(v, name) for v, name in ((mem_ms, "memory"), (fma_ms, "fma")) if v is not None]
    floor_ms, bound = max(cands) if cands else (None, None)
    return {"min_bytes": nbytes, "mem_floor_ms": mem_ms, "fmas": fmas, "fma_floor_ms": fma_ms,
            "floor_ms": floor_ms, "floor_bound": bound}


# ---- issue 3's goals ---------------------------------------------------------------------------
# Stated for bf16, D=128, G=4, K=(3,5,7), batch 64, ResNet-50 and Swin-B shapes, both layouts.
GOAL_FWD_VS_EAGER = 5.0
GOAL_FWDBWD_VS_EAGER = 4.0
GOAL_FWDBWD_VS_COMPILE = 2.0
GOAL_PEAK_MEM_FRACTION = 0.25
GOAL_FLOOR_FACTOR = 1.5
FUSED_PROVIDERS = ("triton", "cuda")


def goals_apply(row: dict) -> bool:
    """Whether issue 3's goals are stated for this row's configuration and provider."""
    return (row.get("kind") == "kernel" and row["provider"] in FUSED_PROVIDERS
            and row["dtype"] == "bf16" and row.get("goal_preset", False)
            and row["D"] == 128 and row["G"] == 4 and row["K"] == "3,5,7" and row["N"] == 64
            and row["mode"] in ("fwd", "fwd+bwd"))


def _check(name: str, value, target: float, higher_is_better: bool, fmt: str) -> dict:
    if value is None:
        return {"goal": name, "value": None, "met": False, "text": f"{name}: MISSED (not measured)"}
    met = value >= target if higher_is_better else value <= target
    return {"goal": name, "value": value, "met": met,
            "text": f"{name}: {'met' if met else 'MISSED'} ({fmt.format(value)})"}


def evaluate_goals(row: dict, eager_peak_mb: float | None) -> list[dict]:
    """Issue 3's goals for one row; empty when they are not stated for it.

    A row that failed, or a number that was not measured, counts as a miss: a goal is met only
    by a measurement.
    """
    if not goals_apply(row):
        return []
    if row["mode"] == "fwd":
        frac = row.get("frac_of_floor")
        return [
            _check(f">={GOAL_FWD_VS_EAGER:g}x eager", row.get("speedup_vs_eager"),
                   GOAL_FWD_VS_EAGER, True, "{:.2f}x"),
            _check(f"<={GOAL_FLOOR_FACTOR:g}x floor", 1.0 / frac if frac else None,
                   GOAL_FLOOR_FACTOR, False, "{:.2f}x"),
        ]
    mem_ratio = None
    if row.get("peak_mem_mb") is not None and eager_peak_mb:
        mem_ratio = row["peak_mem_mb"] / eager_peak_mb
    return [
        _check(f">={GOAL_FWDBWD_VS_EAGER:g}x eager", row.get("speedup_vs_eager"),
               GOAL_FWDBWD_VS_EAGER, True, "{:.2f}x"),
        _check(f">={GOAL_FWDBWD_VS_COMPILE:g}x compile", row.get("speedup_vs_compile"),
               GOAL_FWDBWD_VS_COMPILE, True, "{:.2f}x"),
        _check(f"peak mem <={GOAL_PEAK_MEM_FRACTION:g} eager", mem_ratio,
               GOAL_PEAK_MEM_FRACTION, False, "{:.2f}"),
    ]
