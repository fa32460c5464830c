"""SPEC section 4's numerical contract, as one helper shared by the tests, benchmarks and GPU check.

A fused backend is compared with the reference on the same random inputs and weights:
- float32: relative error ``||out - ref|| / ||ref||`` under 1e-4 (TF32 off) or 1e-3 (TF32 on);
- bfloat16 / float16: no worse than 2x the error of the reference run in the same dtype, both
  measured against a float64 reference (plus a tiny absolute floor, so that a reference that
  happens to be exact in low precision does not demand exactness of the kernel).
"""

from __future__ import annotations

import torch

FP32_TOL = 1e-4
FP32_TF32_TOL = 1e-3
LOWP_FACTOR = 2.0
LOWP_FLOOR = 1e-5


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; NaN or inf anywhere gives inf."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    num = (a - e).norm().item()
    return num / denom if denom > 0 else num


def tolerance(dtype: torch.dtype, *, baseline_error: float | None = None,
              tf32: bool = False) -> float:
    """The largest relative error SPEC allows a fused result of ``dtype``.

    ``baseline_error`` is the reference's own error in ``dtype`` against float64 (required for
    bf16 and fp16).
    """
    if dtype in (torch.float32, torch.float64):
        return FP32_TF32_TOL if tf32 else FP32_TOL
    if baseline_error is None:
        raise ValueError(f"the {dtype} rule needs the reference's own error in {dtype}")
    return LOWP_FACTOR * baseline_error + LOWP_FLOOR


def check_close(name: str, actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype,
                *, baseline: torch.Tensor | None = None, tf32: bool = False) -> float:
    """Assert SPEC's rule for one output or gradient; returns the measured relative error.

    ``expected64`` is the float64 reference; ``baseline`` the reference run in ``dtype`` (needed
    for bf16 and fp16).
    """
    err = rel_error(actual, expected64)
    base = rel_error(baseline, expected64) if baseline is not None else None
    tol = tolerance(dtype, baseline_error=base, tf32=tf32)
    if not err <= tol:  # also catches NaN
        detail = f", reference's own {dtype} error {base:.3e}" if base is not None else ""
        raise AssertionError(
            f"{name}: relative error {err:.3e} exceeds the {dtype} tolerance {tol:.3e}{detail}"
        )
    return err
