"""A frozen projection fused with a low-rank update: one kernel for Serial LoRA, MSPLoRA and LoRA.

Every adapter of the package that sits on a Linear reduces to the same product,
```
y = x W^T + b + (x A^T) V^T          x: (M, K), W: (N, K), A: (R, K), V: (N, R)
```
- LoRA / MSPLoRA: ``V = s B`` (MSPLoRA: the three levels concatenated along the rank,
  ``A = [A_g; A_m; A_l]``, ``V = [s_g B_g, s_m B_m, s_l B_l]``);
- Serial LoRA: ``x~ = x + s (x A^T) B^T`` then ``y = x~ W^T + b``, i.e. ``V = s W B``: the
  augmented reduction ``[x, x A^T] @ [W^T ; s B^T W^T]``.

One kernel serves the forward and the input gradient, since both are ``X P + (X Q) S``:
- forward:  X = x, P = W^T, Q = A^T, S = V^T  ->  out = y,  U = u  = x A^T (saved for backward);
- backward: X = g, P = W,   Q = V,   S = A    ->  out = dx, U = du = g V.
Each program owns one (BLOCK_M, BLOCK_N) tile of ``out``. Its K loop runs the base GEMM and, on
the same X tiles already in registers, the thin ``X Q`` product (BLOCK_R columns, R padded to a
tensor-core width); after the loop, one more ``(X Q) S`` dot adds the low-rank term to the same
accumulator, then the bias. Nothing low-rank ever goes to memory except U, written once by the
programs of the first column. The weight gradients (``dA = du^T x``, ``dV = g^T u``) are thin
products with a long reduction over M; they go to cuBLAS in the op layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compile import FP_FUSION, TRITON_DTYPE, CompileCase
from ._interpreter import fix_interpreter

fix_interpreter()

# The widest concatenated rank the fused kernel takes (BLOCK_R's largest value).
MAX_RANK = 64
BLOCK_RS = (16, 64)
GROUP_M = 8

# Tile shapes per (dtype, dot precision); the launcher picks exactly these and the compile check
# builds them. fp32 without TF32 runs its dots on CUDA cores, so it takes smaller tiles; fp32 with
# TF32 runs 3xTF32 (dot_precision), whose three products take 128x64 (128x128 spilled 2.7 KB on
# sm_80 and 264 B on sm_90; 128x64 spills at most 24 B on sm_90).
def _tile(bm, bn, bk, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


TILES = {
    ("fp32", "ieee"): _tile(64, 64, 16, 8, 2),
    ("fp32", "tf32x3"): _tile(128, 64, 32, 8, 3),
    ("fp16", "tf32"): _tile(128, 128, 64, 8, 3),
    ("bf16", "tf32"): _tile(128, 128, 64, 8, 3),
}
# The unit strides of the two calls (all operands contiguous, as the op layer makes them): Triton
# specialises an integer argument equal to 1, so these are the variants that run.
UNIT_STRIDES = {
    "fwd": ("stride_xk", "stride_pk", "stride_qk", "stride_sr", "stride_on", "stride_ur"),
    "bwd": ("stride_xk", "stride_pn", "stride_qr", "stride_sn", "stride_on", "stride_ur"),
}
# What the launcher sees as multiples of 16 on the shapes that matter (ViT-B/16 and Swin-B:
# d = 768, 128..1024; 197 or 49 tokens times a batch that is a multiple of 16): the allocations
# and every size and stride that is d-sized; the rank-sized ones (R = 8, 14) are not.
DIVISIBLE = ("x_ptr", "p_ptr", "q_ptr", "s_ptr", "bias_ptr", "out_ptr", "u_ptr", "M", "N", "K",
             "stride_xm", "stride_om")
NON_UNIT_D_STRIDE = {"fwd": ("stride_pn", "stride_qr"), "bwd": ("stride_pk", "stride_sr")}


@triton.jit
def _lora_linear_kernel(
    x_ptr, p_ptr, q_ptr, s_ptr, bias_ptr, out_ptr, u_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_pk, stride_pn, stride_qk, stride_qr, stride_sr, stride_sn,
    stride_om, stride_on, stride_um, stride_ur,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = X @ P + (X @ Q) @ S (+ bias); U = X @ Q.

    Arguments (all matrices by pointer and element strides, any layout):
        x_ptr: X (M, K), the activations (forward) or the output gradient (backward).
        p_ptr: P (K, N), the frozen weight seen as a K x N matrix (W^T forward, W backward).
        q_ptr: Q (K, R), the down projection (A^T forward, V backward).
        s_ptr: S (R, N), the up projection (V^T forward, A backward).
        bias_ptr: (N,) added to every row when HAS_BIAS (unused otherwise).
        out_ptr: (M, N) output, in X's dtype.
        u_ptr: (M, R) X @ Q, rounded to X's dtype; written by the programs with pid_n == 0.
        M, N, K, R: sizes; R <= BLOCK_R.
        DOT_PRECISION: "ieee" or "tf32x3" for fp32 operands (ignored for fp16/bf16).
    Tiling: one program per (BLOCK_M, BLOCK_N) tile of out, programs ordered in groups of GROUP_M
    row tiles so that neighbouring programs share P tiles in L2. The K loop accumulates both
    X P (BLOCK_M x BLOCK_N) and X Q (BLOCK_M x BLOCK_R) in fp32; (X Q) is rounded to the input
    dtype, as an unfused GEMM would store it, before its product with S. Tails are masked.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    uacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        p = tl.load(p_ptr + offs_k[:, None] * stride_pk + offs_n[None, :] * stride_pn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        q = tl.load(q_ptr + offs_k[:, None] * stride_qk + offs_r[None, :] * stride_qr,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x, p, acc, input_precision=DOT_PRECISION)
        uacc = tl.dot(x, q, uacc, input_precision=DOT_PRECISION)

    u = uacc.to(x_ptr.dtype.element_ty)
    s = tl.load(s_ptr + offs_r[:, None] * stride_sr + offs_n[None, :] * stride_sn,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc = tl.dot(u, s, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += b[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if pid_n == 0:
        tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, u,
                 mask=mask_m[:, None] & mask_r[None, :])


def block_r(rank: int) -> int:
    """The padded rank the kernel uses for a concatenated rank ``rank``."""
    for br in BLOCK_RS:
        if rank <= br:
            return br
    raise ValueError(f"lora_linear: rank {rank} exceeds the fused kernel's limit of {MAX_RANK}")


def _launch(x, p, p_strides, q, q_strides, s, s_strides, bias, n, r, allow_tf32, wrap):
    """Run the kernel on X = x (M, K); returns (out (M, N), U (M, R)) in x's dtype."""
    m, k = x.shape
    dt = TRITON_DTYPE[x.dtype]
    prec = dot_precision(dt, allow_tf32)
    cfg = TILES[(dt, prec)]
    out, u = outputs(x, n, r)
    if m == 0:
        return out, u
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap(_lora_linear_kernel)[grid](
        x, p, q, s, bias if bias is not None else x, out, u,
        m, n, k, r,
        x.stride(0), x.stride(1), *p_strides, *q_strides, *s_strides,
        out.stride(0), out.stride(1), u.stride(0), u.stride(1),
        HAS_BIAS=bias is not None, DOT_PRECISION=prec,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r(r), GROUP_M=GROUP_M,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
    )
    return out, u


def outputs(x, n: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher's outputs for X = x (M, K), unfilled: out (M, n) and U (M, r), x's dtype and
    device. Also the ops' fake impls (``mslora_kernels.lora_ops``)."""
    m = x.shape[0]
    return x.new_empty((m, n)), x.new_empty((m, r))


def dot_precision(dt: str, allow_tf32: bool) -> str:
    """fp32 with TF32 allowed: 3xTF32, as in the MSLoRA kernels. Triton's plain TF32 dot drops
    the low 13 bits of its fp32 operands instead of rounding them (triton-lang/triton#4574), a
    biased error: emulated at test_op_fp32_tf32_gpu's sizes (K = 768) it gives 1.3e-3, past
    SPEC's 1e-3 TF32 bound (rounded TF32: 3.8e-4)."""
    if dt != "fp32":
        return "tf32"  # ignored for fp16/bf16 operands
    return "tf32x3" if allow_tf32 else "ieee"


def _identity(kernel):
    return kernel


def lora_linear_fwd(x, weight, bias, a, v, allow_tf32: bool = False, wrap=_identity):
    """Forward: ``(y, u)`` with ``y = x W^T + b + u V^T`` and ``u = x A^T``.

    x: (M, K); weight: (N, K); bias: (N,) or None; a: (R, K); v: (N, R); all one dtype and
    device (checked by the caller). ``wrap`` is ``torch.library.wrap_triton`` inside a triton_op.
    """
    n, r = weight.shape[0], a.shape[0]
    return _launch(x, weight, (weight.stride(1), weight.stride(0)), a, (a.stride(1), a.stride(0)),
                   v, (v.stride(1), v.stride(0)), bias, n, r, allow_tf32, wrap)


def lora_linear_bwd_dx(g, weight, a, v, allow_tf32: bool = False, wrap=_identity):
    """Input gradient: ``(dx, du)`` with ``du = g V`` and ``dx = g W + du A``.

    g: (M, N), the output gradient; weight: (N, K); a: (R, K); v: (N, R).
    """
    k, r = weight.shape[1], a.shape[0]
    return _launch(g, weight, (weight.stride(0), weight.stride(1)), v, (v.stride(0), v.stride(1)),
                   a, (a.stride(0), a.stride(1)), None, k, r, allow_tf32, wrap)


def compile_cases() -> list[CompileCase]:
    """Every (dtype, precision, rank block, call, bias) configuration the launchers can pick."""
    sizes = ("M", "N", "K", "R", "stride_xm", "stride_xk", "stride_pk", "stride_pn", "stride_qk",
             "stride_qr", "stride_sr", "stride_sn", "stride_om", "stride_on", "stride_um",
             "stride_ur")
    cases = []
    for (dt, prec), cfg in TILES.items():
        for br in BLOCK_RS:
            for call, has_bias in (("fwd", True), ("fwd", False), ("bwd", False)):
                sig = {n: f"*{dt}" for n in ("x_ptr", "p_ptr", "q_ptr", "s_ptr", "bias_ptr",
                                             "out_ptr", "u_ptr")}
                sig.update({n: "i32" for n in sizes})
                const = {n: 1 for n in UNIT_STRIDES[call]}
                const.update({"HAS_BIAS": has_bias, "DOT_PRECISION": prec,
                              "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                              "BLOCK_K": cfg["BLOCK_K"], "BLOCK_R": br, "GROUP_M": GROUP_M})
                sig.update({n: "constexpr" for n in const})
                name = (f"lora_linear[{call},{dt},{prec},R<={br},bias={int(has_bias)},"
                        f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}]")
                cases.append(CompileCase(name, _lora_linear_kernel, sig, const,
                                         num_warps=cfg["num_warps"],
                                         num_stages=cfg["num_stages"],
                                         divisible_by_16=DIVISIBLE + NON_UNIT_D_STRIDE[call]))
    return cases
