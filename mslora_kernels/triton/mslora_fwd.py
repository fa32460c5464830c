"""The fused MSLoRA forward in two Triton passes: ``out = x + H(x)`` (SPEC section 1).

Pass plan (DESIGN.md "Forward, 2 passes"), bytes per pixel in elements:

- **F1** (:func:`_mslora_f1_kernel`): read x (C), compute ``u = LN_C(x) | x`` and ``z = down(u)``,
  write z once (D) in an (N, H, W, D) scratch buffer. Also, per option: the LN_C statistics
  (``prenorm``, 2 fp32 per pixel), the gate logits ``gate_i(z)`` (``gate``, 4 fp32 per pixel) and
  per-(image, tile, channel) partial sums of z (``pool``, reduced by a tiny fixed-order sum into
  ``zmean``, so the result is deterministic).
- **F2** (:func:`_mslora_f2_kernel`): one program per spatial tile of one image. It reads z on the
  tile plus the halo of the *largest* kernel once per tap and serves every kernel size from that
  one load (each tap of the largest kernel is loaded once and added to the accumulator of every
  path whose window contains it); GELU, gate, sum, pool, enhance happen in registers, the per-path
  results and their sum are never written. Then ``t = pw(s)`` with ``tl.dot``, ``a = proj(u)``
  recomputed from x with ``tl.dot``, ``m = a * t``, ``y = up(shuffle(m))`` with ``tl.dot`` (the
  shuffle is folded into the up-projection's weight indexing) and ``out = x + y``, written once.

Every option is fully fused into these two passes: ``prenorm`` (statistics in F1, normalisation
while loading x in both passes), ``enhance`` (LayerNorm over D in F2's registers), ``pool``
(partial sums in F1, a (N, T, D) -> (N, D) sum between the passes), ``gate`` (logits in F1,
sigmoids in F2) and ``shuffle`` (weight indexing in F2).

Design choices worth knowing:
- The grouped 1x1 convolutions (down, proj, up) run on tensor cores as dense products against a
  block-diagonal weight tile built by masked loads (the shuffle folds into that mask), so one tile
  of every D channel lives in registers. This costs G times the minimal tensor-core FLOPs of those
  three products (pw is dense anyway); it keeps every intermediate in one register tile.
- Layouts: x and out are addressed through explicit element strides (n, c, h, w), so one kernel
  serves NCHW, NCHW in ``torch.channels_last`` memory format and (N, H, W, C).
- dtypes: fp32, fp16, bf16 operands; every accumulation in fp32. fp32 products never use
  plain TF32 (see :func:`use_tf32x3`), so fp32 meets SPEC's TF32-off 1e-4 rule; fp32 tiles
  run with 8 warps (their dot operands take twice the registers).
- Image slices: the launcher runs F1/F2 over slices of whole images
  (``mslora_kernels.workspace.image_slices``) so that the scratch between the passes (z and the
  per-pixel statistics, :func:`workspace_bytes_per_pixel`) stays within the workspace budget
  (``MSLORA_WORKSPACE_MB``, default 64 MiB; one image at least); allocated once at the largest
  slice and reused, out and zmean written into slices of the full outputs. Every value is per
  image, so the result does not depend on the slicing.
- Limits: up to four kernel sizes (:data:`MAX_PATHS`, the paper uses three) and D <= 512
  (:data:`MAX_RANK`); the launcher refuses more with a ValueError before any launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import MSLoRAOptions
from ..workspace import image_slices, rows
from ._common import (
    MAX_PATHS,
    MAX_RANK,
    kernel_size_slots,
    nchw_strides,
    normalize_layout,
    wrap_triton,
)
from ._compile import (
    ALIGNED_RANK,
    COMPILE_RANKS,
    FP_FUSION,
    TRITON_DTYPE,
    CompileCase,
    aligned,
)
from ._interpreter import fix_interpreter
from ._jit import ln_c_stats
from .gelu import gelu_fp32
from .taps import pack_taps

fix_interpreter()

GATE_STRIDE = 4  # fp32 gate logits stored per pixel (one per path, MAX_PATHS slots)

# Tile heuristics: every value below is a finite choice that compile_cases() enumerates.
BLOCK_K = 32  # channels of x per tl.dot step (proj, down)
BLOCK_CO = 16  # output channels per up-projection tl.dot step
DW_CHUNK = 32  # D channels per depthwise step in F2 (all of BLOCK_D under enhance)
NUM_STAGES = 2  # software pipelining depth of the tl.dot loops (launch and compile check)


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, acc, TF32X3: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation: ``tf32x3`` precision when TF32X3 (fp32
    operands, about fp32 accuracy on tensor cores), otherwise ``ieee`` (exact products; for
    fp16/bf16 operands this is the ordinary tensor-core product)."""
    if TF32X3:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _grouped_in_proj(x_base, pix_off, pmask, w_ptr, nw_ptr, nb_ptr, mean, rstd, C, D, CG, DG,
                     sxc, PRENORM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     TF32X3: tl.constexpr):
    """``u @ W_bd^T`` for a grouped 1x1 conv C -> D (proj or down), fp32 [BLOCK_P, BLOCK_D].

    ``w_ptr``: the (D, C/G) weight. ``W_bd`` is its block-diagonal (D, C) form, built by masked
    loads, so each step is one dense ``tl.dot`` of [BLOCK_P, BLOCK_K] x [BLOCK_K, BLOCK_D].
    ``u`` is x, or LN_C(x) with the given statistics and affine (``nw_ptr``, ``nb_ptr``) when
    PRENORM. Padded columns (d >= D) come out zero.
    """
    kk = tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    gd = dd // DG
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        c = k0 + kk
        cmask = c < C
        msk = pmask[:, None] & cmask[None, :]
        u = tl.load(x_base + pix_off[:, None] + c[None, :] * sxc, mask=msk, other=0.0)
        if PRENORM:
            gam = tl.load(nw_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            bet = tl.load(nb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            u = (u.to(tl.float32) - mean[:, None]) * rstd[:, None] * gam[None, :] + bet[None, :]
            u = tl.where(msk, u, 0.0)
        gc = c // CG
        wmask = cmask[:, None] & dmask[None, :] & (gc[:, None] == gd[None, :])
        wt = tl.load(w_ptr + dd[None, :] * CG + (c[:, None] - gc[:, None] * CG), mask=wmask,
                     other=0.0)
        acc = _mma(u.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, TF32X3)
    return acc


@triton.jit
def _tap(acc, zs, w_ptr, d, dmask, D, dy, DX: tl.constexpr, K: tl.constexpr,
         RMAX: tl.constexpr):
    """Add tap (dy, DX) of the largest window to one path's accumulator if its K x K window
    contains that tap. ``w_ptr``: the path's taps, tap-major (K*K, D) (``taps.pack_taps``:
    the step's DC channels of one tap contiguous). The column test is resolved at compile time, the
    row test (dy is a loop counter) is one uniform branch per program."""
    OFF: tl.constexpr = RMAX - K // 2
    if DX >= OFF and DX < OFF + K:
        ky = dy - OFF
        if (ky >= 0) & (ky < K):
            wv = tl.load(w_ptr + (ky * K + (DX - OFF)) * D + d, mask=dmask, other=0.0)
            acc += zs * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def _path(acc, gl_ptr, gidx, pmask, I: tl.constexpr, GATE: tl.constexpr):
    """GELU of one path's depthwise result, times sigmoid(gate logit of path I) when GATE."""
    p = gelu_fp32(acc)
    if GATE:
        gl = tl.load(gl_ptr + gidx * 4 + I, mask=pmask, other=0.0)
        p = p * (1.0 / (1.0 + tl.exp(-gl)))[:, None]
    return p


# --------------------------------------------------------------------------------------------
# F1: z = down(u) (+ LN_C stats, gate logits, pool partial sums)
# --------------------------------------------------------------------------------------------
@triton.jit
def _mslora_f1_kernel(
    x_ptr, down_ptr, nw_ptr, nb_ptr, gw_ptr, gb_ptr,
    z_ptr, stats_ptr, glog_ptr, part_ptr,
    C, D, CG, DG, H, W, NT,
    sxn, sxc, sxh, sxw,
    PRENORM: tl.constexpr, POOL: tl.constexpr, GATE: tl.constexpr, NPATHS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    TF32X3: tl.constexpr,
):
    """F1 of the fused forward: one program per BLOCK_P consecutive pixels of one image.

    Grid ``(NT = cdiv(H*W, BLOCK_P), N)``.
    Args:
        x_ptr: input, element strides (sxn, sxc, sxh, sxw) for (n, c, h, w) -- any of the three
            layouts. down_ptr: (D, C/G) weight. nw_ptr, nb_ptr: LN_C affine (PRENORM).
            gw_ptr, gb_ptr: (NPATHS, D) gate weights and (NPATHS,) biases (GATE).
        z_ptr: out, (N, H, W, D) contiguous z in x's dtype.
        stats_ptr: out (PRENORM), (N*H*W, 2) fp32 mean and 1/std over C.
        glog_ptr: out (GATE), (N*H*W, 4) fp32 gate logits ``gate_i(z) + b_i``.
        part_ptr: out (POOL), (N, NT, D) fp32 sums of z over this program's pixels, over H*W
            (so that their sum over the NT programs is the mean).
        C, D, CG, DG: channels, rank, C/G, D/G. H, W: spatial size. NT: programs per image.
    Tiling: [BLOCK_P pixels, BLOCK_D = max(16, next_pow2(D)) channels] in registers, the C
    contraction in BLOCK_K steps of ``tl.dot``; z is written once, masked to d < D.
    """
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    HW = H * W
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    h = p // W
    w = p % W
    x_base = x_ptr + n * sxn
    pix_off = h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    gidx = n * HW + p  # global pixel index
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_P], dtype=tl.float32)
    if PRENORM:
        mean, rstd = ln_c_stats(x_base, pix_off, pmask, C, sxc, BLOCK_P, BLOCK_K)
        tl.store(stats_ptr + gidx * 2, mean, mask=pmask)
        tl.store(stats_ptr + gidx * 2 + 1, rstd, mask=pmask)
    z = _grouped_in_proj(x_base, pix_off, pmask, down_ptr, nw_ptr, nb_ptr, mean, rstd, C, D,
                         CG, DG, sxc, PRENORM, BLOCK_P, BLOCK_D, BLOCK_K,
                         z_ptr.dtype.element_ty, TF32X3)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    zq = z.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + gidx[:, None] * D + dd[None, :], zq, mask=pmask[:, None] & dmask[None, :])
    zr = zq.to(tl.float32)  # what F2 reads back: gate and pool see the stored z
    if POOL:
        zsum = tl.sum(tl.where(pmask[:, None], zr, 0.0), axis=0) / HW
        tl.store(part_ptr + (n * NT + pid) * D + dd, zsum, mask=dmask)
    if GATE:
        for i in tl.static_range(NPATHS):
            gw = tl.load(gw_ptr + i * D + dd, mask=dmask, other=0.0).to(tl.float32)
            gl = tl.sum(zr * gw[None, :], axis=1) + tl.load(gb_ptr + i).to(tl.float32)
            tl.store(glog_ptr + gidx * 4 + i, gl, mask=pmask)


# --------------------------------------------------------------------------------------------
# F2: depthwise multi-scale core + pw + proj + product + up + residual
# --------------------------------------------------------------------------------------------
@triton.jit
def _mslora_f2_kernel(
    x_ptr, out_ptr, z_ptr, stats_ptr, glog_ptr, zmean_ptr,
    proj_ptr, pw_ptr, up_ptr, nw_ptr, nb_ptr, ew_ptr, eb_ptr,
    dw0_ptr, dw1_ptr, dw2_ptr, dw3_ptr,
    C, D, CG, DG, G, H, W, TILES_W,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, KMAX: tl.constexpr,
    PRENORM: tl.constexpr, ENHANCE: tl.constexpr, POOL: tl.constexpr, GATE: tl.constexpr,
    SHUFFLE: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_D: tl.constexpr, DC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr, TF32X3: tl.constexpr,
):
    """F2 of the fused forward: everything after z, for one TH x TW tile of one image.

    Grid ``(cdiv(H, TH) * cdiv(W, TW), N)``.
    Args:
        x_ptr, out_ptr: input and output, element strides (n, c, h, w) each (any layout).
        z_ptr: (N, H, W, D) z from F1. stats_ptr: (N*H*W, 2) LN_C stats (PRENORM).
        glog_ptr: (N*H*W, 4) gate logits (GATE). zmean_ptr: (N, D) fp32 mean of z (POOL).
        proj_ptr: (D, C/G). pw_ptr: (D, D). up_ptr: (C, D/G). nw/nb: LN_C affine (PRENORM).
        ew/eb: LN_D affine (ENHANCE). dw{i}_ptr: path i's taps, (K_i*K_i, D) tap-major.
        K0..K3: the kernel sizes in K's order, 0 for an absent path (K0 is always present);
        KMAX: the largest of them (the halo is KMAX // 2).
    Tiling:
        pixels: a TH x TW spatial tile (BLOCK_P = TH*TW rows of every register tile);
        depthwise: D in DC-channel steps (DC = BLOCK_D under ENHANCE, whose LayerNorm needs
        all of D). For each step every tap of the largest window is loaded once (z on the tile
        plus its halo, zero outside the image) and added to the accumulator of each path
        containing it (rows of taps in a loop, the KMAX taps of a row unrolled); then GELU
        (x sigmoid(gate)), the path sum, pool, enhance, and
        ``t += s_step @ pw[:, step]^T`` on tensor cores. t is [BLOCK_P, BLOCK_D] fp32.
        proj: ``a = u @ proj_bd^T`` in BLOCK_K steps; ``m = a * t``.
        up: per BLOCK_CO output channels, ``y = m @ up_eff^T`` where ``up_eff`` is the
        block-diagonal up weight with the channel shuffle folded into its column index; then
        ``out = x + y`` is stored, the only write of this pass.
    """
    pid_t = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    th0 = (pid_t // TILES_W) * TH
    tw0 = (pid_t % TILES_W) * TW
    BLOCK_P: tl.constexpr = TH * TW
    rr = tl.arange(0, BLOCK_P)
    ph = th0 + rr // TW
    pw_ = tw0 + rr % TW
    pmask = (ph < H) & (pw_ < W)
    HW = H * W
    gidx = n * HW + ph * W + pw_
    DOT_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    RMAX: tl.constexpr = KMAX // 2
    z_base = z_ptr + n * HW * D

    # ---- the multi-scale core and t = pw(s), D in DC-channel steps ----
    dd = tl.arange(0, BLOCK_D)
    dmask_full = dd < D
    t = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for dc0 in range(0, BLOCK_D, DC):
        d = dc0 + tl.arange(0, DC)
        dmask = d < D
        acc0 = tl.zeros([BLOCK_P, DC], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_P, DC], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_P, DC], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_P, DC], dtype=tl.float32)
        for dy in range(KMAX):  # a loop (not unrolled): bounds the taps' registers in flight
            hh = ph + (dy - RMAX)
            hok = pmask & (hh >= 0) & (hh < H)
            for dx in tl.static_range(KMAX):
                ww = pw_ + (dx - RMAX)
                ok = hok & (ww >= 0) & (ww < W)
                zs = tl.load(z_base + (hh * W + ww)[:, None] * D + d[None, :],
                             mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                acc0 = _tap(acc0, zs, dw0_ptr, d, dmask, D, dy, dx, K0, RMAX)
                if K1 > 0:
                    acc1 = _tap(acc1, zs, dw1_ptr, d, dmask, D, dy, dx, K1, RMAX)
                if K2 > 0:
                    acc2 = _tap(acc2, zs, dw2_ptr, d, dmask, D, dy, dx, K2, RMAX)
                if K3 > 0:
                    acc3 = _tap(acc3, zs, dw3_ptr, d, dmask, D, dy, dx, K3, RMAX)
        s = _path(acc0, glog_ptr, gidx, pmask, 0, GATE)
        if K1 > 0:
            s += _path(acc1, glog_ptr, gidx, pmask, 1, GATE)
        if K2 > 0:
            s += _path(acc2, glog_ptr, gidx, pmask, 2, GATE)
        if K3 > 0:
            s += _path(acc3, glog_ptr, gidx, pmask, 3, GATE)
        if POOL:
            zm = tl.load(zmean_ptr + n * D + d, mask=dmask, other=0.0)
            s += gelu_fp32(zm)[None, :]
        s = tl.where(dmask[None, :], s, 0.0)
        if ENHANCE:  # DC == BLOCK_D here: the whole of D is in this step
            mu = tl.sum(s, axis=1) / D
            dv = tl.where(dmask[None, :], s - mu[:, None], 0.0)
            rs = 1.0 / tl.sqrt(tl.sum(dv * dv, axis=1) / D + 1e-6)
            gam = tl.load(ew_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            bet = tl.load(eb_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            s = gelu_fp32(dv * rs[:, None] * gam[None, :] + bet[None, :])
        # t[:, e] += sum_d s[:, d] pw[e, d]: the B tile is pw[:, step]^T, [DC, BLOCK_D]
        rt = tl.load(pw_ptr + dd[None, :] * D + d[:, None],
                     mask=dmask[:, None] & dmask_full[None, :], other=0.0)
        t = _mma(s.to(DOT_DTYPE), rt.to(DOT_DTYPE), t, TF32X3)

    # ---- a = proj(u), m = a * t ----
    x_base = x_ptr + n * sxn
    pix_off = ph.to(tl.int64) * sxh + pw_.to(tl.int64) * sxw
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_P], dtype=tl.float32)
    if PRENORM:
        mean = tl.load(stats_ptr + gidx * 2, mask=pmask, other=0.0)
        rstd = tl.load(stats_ptr + gidx * 2 + 1, mask=pmask, other=0.0)
    a = _grouped_in_proj(x_base, pix_off, pmask, proj_ptr, nw_ptr, nb_ptr, mean, rstd, C, D,
                         CG, DG, sxc, PRENORM, BLOCK_P, BLOCK_D, BLOCK_K, DOT_DTYPE, TF32X3)
    m = (a * t).to(DOT_DTYPE)

    # ---- y = up(shuffle(m)), out = x + y ----
    # m index dd feeds m' index q(dd): dd = g*DG + j -> q = j*G + g under shuffle.
    if SHUFFLE:
        q = (dd % DG) * G + dd // DG
    else:
        q = dd
    gq = q // DG
    o_base = out_ptr + n * son
    o_off = ph.to(tl.int64) * soh + pw_.to(tl.int64) * sow
    cc = tl.arange(0, BLOCK_CO)
    for c0 in range(0, C, BLOCK_CO):
        c = c0 + cc
        cmask = c < C
        gc = c // CG
        umask = dmask_full[:, None] & cmask[None, :] & (gq[:, None] == gc[None, :])
        ut = tl.load(up_ptr + c[None, :] * DG + (q[:, None] - gc[None, :] * DG), mask=umask,
                     other=0.0)
        y = _mma(m, ut.to(DOT_DTYPE), tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32), TF32X3)
        omask = pmask[:, None] & cmask[None, :]
        xv = tl.load(x_base + pix_off[:, None] + c[None, :] * sxc, mask=omask, other=0.0)
        res = xv.to(tl.float32) + y
        tl.store(o_base + o_off[:, None] + c[None, :] * soc, res.to(out_ptr.dtype.element_ty),
                 mask=omask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def block_d(rank: int) -> int:
    """Register width of the D dimension: a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(rank))


def f2_config(rank: int, enhance: bool, dtype: torch.dtype) -> dict:
    """F2's tile for a rank. The fp32 t accumulator [BLOCK_P, BLOCK_D] stays at or under 4096
    elements (2048 with enhance, whose depthwise accumulators span all of D), BLOCK_P >= 16
    (tl.dot's minimum); 8 warps once a tile exceeds 4096 elements."""
    bd = block_d(rank)
    budget = 2048 if enhance else 4096
    bp = max(16, min(64, budget // bd))
    th, tw = {64: (8, 8), 32: (4, 8), 16: (4, 4)}[bp]
    dc = bd if enhance else min(bd, DW_CHUNK)
    return {"TH": th, "TW": tw, "BLOCK_D": bd, "DC": dc,
            "num_warps": 8 if bp * bd > 4096 or dtype == torch.float32 else 4,
            "num_stages": NUM_STAGES}


def f1_config(rank: int, dtype: torch.dtype) -> dict:
    """F1's tile: [BLOCK_P, BLOCK_D] fp32 z accumulator of at most 4096 elements, 4 warps."""
    bd = block_d(rank)
    return {"BLOCK_P": max(16, min(64, 4096 // bd)), "BLOCK_D": bd,
            "num_warps": 8 if bd > 256 or dtype == torch.float32 else 4,
            "num_stages": NUM_STAGES}


def use_tf32x3(dtype: torch.dtype, enhance: bool = False) -> bool:
    """The TF32X3 constexpr: how one kernel's tl.dot products treat fp32 operands. Never plain
    TF32 (SPEC's 1e-4 rule is for TF32 off): "ieee" (CUDA-core FMAs) where that compiles
    without spills, "tf32x3" (three TF32 tensor-core products, about fp32 accuracy) for F2
    under enhance, whose [pixels x D] x [D x D] FMA product would spill. fp16/bf16: False."""
    return dtype == torch.float32 and enhance


def check_supported(x: torch.Tensor, o: MSLoRAOptions) -> None:
    """Refuse, before any launch, what these kernels do not cover."""
    if x.dtype not in TRITON_DTYPE:
        raise TypeError(f"MSLoRA triton: dtype {x.dtype} not supported; "
                        "use float32, float16 or bfloat16")
    if len(o.kernel_sizes) > MAX_PATHS:
        raise ValueError(f"MSLoRA triton: at most {MAX_PATHS} kernel sizes are fused, got "
                         f"{len(o.kernel_sizes)} ({o.kernel_sizes})")
    if o.rank > MAX_RANK:
        raise ValueError(f"MSLoRA triton: rank {o.rank} exceeds the fused kernels' "
                         f"maximum {MAX_RANK}")


def workspace_bytes_per_pixel(o: MSLoRAOptions, dtype: torch.dtype) -> int:
    """The forward's scratch bytes per pixel between F1 and F2: z (D, compute dtype), the LN_C
    statistics (prenorm, 2 fp32), the gate logits (gate, GATE_STRIDE fp32) and the pool partial
    sums (pool, D fp32 per F1 program of BLOCK_P pixels, rounded up)."""
    per = o.rank * dtype.itemsize + (8 if o.prenorm else 0) + (4 * GATE_STRIDE if o.gate else 0)
    if o.pool:
        per += -(-4 * o.rank // f1_config(o.rank, dtype)["BLOCK_P"])
    return per


def mslora_fwd(x: torch.Tensor, weights: dict, o: MSLoRAOptions):
    """Returns (out, zmean). out = x + H(x), same shape/layout/dtype/memory format as x.

    zmean: (N, D) float32 mean over H, W of z (= down(u)) when o.pool, else None.
    ``weights``: the checkpoint-named parameters, already in x's dtype.
    """
    check_supported(x, o)
    x = normalize_layout(x, o.data_format)
    if o.data_format == "channels_last":
        n, h, w, c = x.shape
    else:
        n, c, h, w = x.shape
    d, g = o.rank, o.groups
    cg, dg = c // g, d // g
    dev, dt = x.device, x.dtype
    wt = {k: v.contiguous() for k, v in weights.items()}
    out = torch.empty_like(x)
    sxn, sxc, sxh, sxw = nchw_strides(x, o.data_format)
    son, soc, soh, sow = nchw_strides(out, o.data_format)
    hw = h * w

    cfg1 = f1_config(d, dt)
    nt = triton.cdiv(hw, cfg1["BLOCK_P"])
    # Slices of whole images (see the module doc); the scratch at the largest slice, reused.
    slices = image_slices(n, hw * workspace_bytes_per_pixel(o, dt))
    ns_max = max(n1 - n0 for n0, n1 in slices)
    z = torch.empty((ns_max * hw, d), device=dev, dtype=dt)
    stats = torch.empty((ns_max * hw, 2) if o.prenorm else (1,), device=dev, dtype=torch.float32)
    glog = torch.empty((ns_max * hw, GATE_STRIDE) if o.gate else (1,), device=dev,
                       dtype=torch.float32)
    part = torch.empty((ns_max * nt, d) if o.pool else (1,), device=dev, dtype=torch.float32)
    zmean = torch.empty((n, d), device=dev, dtype=torch.float32) if o.pool else None
    nw = wt["norm.weight"] if o.prenorm else wt["down.weight"]
    nb = wt["norm.bias"] if o.prenorm else wt["down.weight"]
    gw = wt["gate.weight"] if o.gate else wt["down.weight"]
    gb = wt["gate.bias"] if o.gate else wt["down.weight"]

    cfg2 = f2_config(d, o.enhance, dt)
    tiles_w = triton.cdiv(w, cfg2["TW"])
    tiles2 = triton.cdiv(h, cfg2["TH"]) * tiles_w
    ks = kernel_size_slots(o.kernel_sizes)
    # every path's taps tap-major in one buffer (one launch), path i a view at its offset
    taps, woffs, _, _ = pack_taps(wt, o.kernel_sizes, d)
    dws = [taps[woffs[i]:] if ks[i] else taps for i in range(MAX_PATHS)]
    ew = wt["enorm.weight"] if o.enhance else wt["pw.weight"]
    eb = wt["enorm.bias"] if o.enhance else wt["pw.weight"]

    for n0, n1 in slices:
        # Batch slices of x and out: views with the full tensors' strides (image n of the slice
        # at n * sxn from the view's start); the scratch's leading rows.
        ns = n1 - n0
        xs, outs = rows(x, n0, n1), rows(out, n0, n1)
        zs = rows(z, 0, ns * hw)
        stats_s = rows(stats, 0, ns * hw) if o.prenorm else stats
        glog_s = rows(glog, 0, ns * hw) if o.gate else glog
        part_s = rows(part, 0, ns * nt) if o.pool else part
        wrap_triton(_mslora_f1_kernel)[(nt, ns)](
            xs, wt["down.weight"], nw, nb, gw, gb, zs, stats_s, glog_s, part_s,
            c, d, cg, dg, h, w, nt, sxn, sxc, sxh, sxw,
            PRENORM=o.prenorm, POOL=o.pool, GATE=o.gate, NPATHS=len(o.kernel_sizes),
            BLOCK_P=cfg1["BLOCK_P"], BLOCK_D=cfg1["BLOCK_D"], BLOCK_K=BLOCK_K,
            TF32X3=use_tf32x3(dt),
            num_warps=cfg1["num_warps"], num_stages=cfg1["num_stages"], enable_fp_fusion=FP_FUSION,
        )
        zmean_s = stats
        if o.pool:
            # a fixed-order reduce of the per-tile partial means (deterministic, tiny)
            zmean_s = torch.sum(part_s.view(ns, nt, d), dim=1, out=rows(zmean, n0, n1))

        wrap_triton(_mslora_f2_kernel)[(tiles2, ns)](
            xs, outs, zs, stats_s, glog_s, zmean_s,
            wt["proj.weight"], wt["pw.weight"], wt["up.weight"], nw, nb, ew, eb, *dws,
            c, d, cg, dg, g, h, w, tiles_w, sxn, sxc, sxh, sxw, son, soc, soh, sow,
            K0=ks[0], K1=ks[1], K2=ks[2], K3=ks[3], KMAX=max(ks),
            PRENORM=o.prenorm, ENHANCE=o.enhance, POOL=o.pool, GATE=o.gate, SHUFFLE=o.shuffle,
            TH=cfg2["TH"], TW=cfg2["TW"], BLOCK_D=cfg2["BLOCK_D"], DC=cfg2["DC"],
            BLOCK_K=BLOCK_K, BLOCK_CO=BLOCK_CO, TF32X3=use_tf32x3(dt, o.enhance),
            num_warps=cfg2["num_warps"], num_stages=cfg2["num_stages"], enable_fp_fusion=FP_FUSION,
        )
    return out, zmean


# --------------------------------------------------------------------------------------------
# Compile check
# --------------------------------------------------------------------------------------------
_F1_ARGS = ("x_ptr", "down_ptr", "nw_ptr", "nb_ptr", "gw_ptr", "gb_ptr", "z_ptr", "stats_ptr",
            "glog_ptr", "part_ptr")
_F2_PTRS = ("x_ptr", "out_ptr", "z_ptr", "stats_ptr", "glog_ptr", "zmean_ptr", "proj_ptr",
            "pw_ptr", "up_ptr", "nw_ptr", "nb_ptr", "ew_ptr", "eb_ptr", "dw0_ptr", "dw1_ptr",
            "dw2_ptr", "dw3_ptr")
_FP32_PTRS = ("stats_ptr", "glog_ptr", "part_ptr", "zmean_ptr")

# Option sets enumerated for the compile check: none, all on, and enhance alone (enhance changes
# the F2 tile); with D = 128 and the default K = (3, 5, 7) (the tile heuristics depend only on
# BLOCK_D and enhance, and K only changes the unrolled taps).
COMPILE_OPTION_SETS = (
    {},
    {"enhance": True},
    {"prenorm": True, "enhance": True, "pool": True, "gate": True, "shuffle": True},
)
COMPILE_KERNEL_SIZES = (3, 5, 7)


def _sig(names, dt, ints, constexprs):
    sig = {k: ("*fp32" if k in _FP32_PTRS else f"*{dt}") for k in names}
    sig.update({k: "i32" for k in ints})
    sig.update({k: "constexpr" for k in constexprs})
    return sig


def compile_cases() -> list[CompileCase]:
    """Every (F1, F2) configuration the launcher picks for D in COMPILE_RANKS, the default K and
    the option sets in COMPILE_OPTION_SETS, in fp32/fp16/bf16. Layouts are runtime strides, so
    one compiled kernel serves all three."""
    cases = []
    for torch_dt, dt in TRITON_DTYPE.items():
        for d in COMPILE_RANKS:
            for opts in COMPILE_OPTION_SETS:
                tag = "+".join(sorted(opts)) or "plain"
                o = {k: opts.get(k, False)
                     for k in ("prenorm", "enhance", "pool", "gate", "shuffle")}
                c1 = f1_config(d, torch_dt)
                ce1 = {"PRENORM": o["prenorm"], "POOL": o["pool"], "GATE": o["gate"],
                       "NPATHS": len(COMPILE_KERNEL_SIZES), "BLOCK_P": c1["BLOCK_P"],
                       "BLOCK_D": c1["BLOCK_D"], "BLOCK_K": BLOCK_K,
                       "TF32X3": use_tf32x3(torch_dt)}
                cases.append(CompileCase(
                    f"mslora_f1[{dt},D={d},{tag}]", _mslora_f1_kernel,
                    _sig(_F1_ARGS, dt, ("C", "D", "CG", "DG", "H", "W", "NT", "sxn", "sxc",
                                         "sxh", "sxw"), ce1), ce1,
                    num_warps=c1["num_warps"], num_stages=c1["num_stages"]))
                c2 = f2_config(d, o["enhance"], torch_dt)
                ks = kernel_size_slots(COMPILE_KERNEL_SIZES)
                ce2 = {"K0": ks[0], "K1": ks[1], "K2": ks[2], "K3": ks[3], "KMAX": max(ks),
                       "PRENORM": o["prenorm"], "ENHANCE": o["enhance"], "POOL": o["pool"],
                       "GATE": o["gate"], "SHUFFLE": o["shuffle"], "TH": c2["TH"],
                       "TW": c2["TW"], "BLOCK_D": c2["BLOCK_D"], "DC": c2["DC"],
                       "BLOCK_K": BLOCK_K, "BLOCK_CO": BLOCK_CO,
                       "TF32X3": use_tf32x3(torch_dt, o["enhance"])}
                cases.append(CompileCase(
                    f"mslora_f2[{dt},D={d},{tag}]", _mslora_f2_kernel,
                    _sig(_F2_PTRS, dt, ("C", "D", "CG", "DG", "G", "H", "W", "TILES_W", "sxn",
                                         "sxc", "sxh", "sxw", "son", "soc", "soh", "sow"),
                         ce2), ce2,
                    num_warps=c2["num_warps"], num_stages=c2["num_stages"]))
    # what D = 128 runs with the usual widths: every pointer and size 16-divisible
    cases += [aligned(c) for c in cases if f"D={ALIGNED_RANK}," in c.name]
    return cases
