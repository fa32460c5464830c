"""The backward of fused MSLoRA: gradients for x and every parameter, in three Triton kernels
(and three small ones around them).

Entry point: :func:`mslora_bwd` (see ``TRITON_CONTRACT``). What the forward saved is only x, the
weights and ``zmean`` (pool); everything D-sized is recomputed here, per tile, from x. The
formulas are DESIGN.md's "Backward" section; the pass plan is its two-pass B1/B2 plan, preceded by
a small pass B0 that recomputes z once (the depthwise taps then read z from a buffer, L2
resident, instead of recomputing ``Q u`` 83 times per pixel):

- B0 ``_bwd_z_kernel``: read x, write ``z = Q u`` (D per pixel, compute dtype).
- B1 ``_bwd_main_kernel``: on a tile, recompute ``a = P u``, ``c_i`` (z with halo), ``s0``,
  ``s`` and ``t = R s`` (s and later dt staged through the tile's rows of dc of the smallest
  kernel, see Registers; every other ``c_i`` is kept in its own dc_i rows, so that the per-path
  loop reads it back where it recomputed all of them: 9 of 83 taps recomputed at
  K = (3, 5, 7), not 83); from ``d`` get ``dm``, ``da``, ``dt``, ``ds``, ``ds0``; then per path
  ``dc_i`` (written, D per pixel and path, compute dtype) and the gate's ``dg_i``. Write
  ``du_a = P^T da (+ Q^T dz_gate)`` (C per pixel, fp32). Accumulate dU, dR, dP, enorm, gate,
  dQ's gate part and the per-image sum of ``ds0`` (pool).
- B2 ``_bwd_dz_kernel``: on a tile, ``dz = sum_i flip(K_i) * dc_i`` (dc_i read with halo), plus
  the pool term; accumulate ``dK_i`` (``dc_i`` times z with halo) and dQ; write
  ``dx = d + du`` or ``d + LN_C backward(du)`` (prenorm, with norm's gradients).

Around them, per call: ``taps.pack_taps`` (the depthwise taps tap-major, and the int32 sizes and
offsets B1 and B2 index them by), the gradient buffer's zeroing, per slice with pool
``_bwd_pool_kernel`` (pool's term of dz from B1's per-image sums of ds0, which it zeroes for
the next slice), and last ``_bwd_finish_kernel``, which writes every weight gradient (summed
over the deterministic mode's rows, cast, the taps' turned back to the checkpoint's layout)
into the one flat tensor the op returns. 6 launches a call (7 with pool; B0-B2 and the pool
kernel once per image slice); there were 26 to 45, mostly small tensor ops (per-path copies of
the taps, a fill kernel per int of the index tables, the pool term's dozen elementwise ops, a
sum and a cast per gradient, the concatenation), each costing a launch at sizes (Swin-B's 7x7
stage) where the fused kernels' own work takes a few microseconds.

Transient bytes per pixel (elements; C input channels, D rank, nK = len(K)):
z and dc_i are kept in the compute dtype (the reference rounds them there too), du in fp32.
B0 reads x (C), writes z (D); B1 reads x, d (2C) and z (D, + the halo, from L2), writes dc
(nK*D; c_i goes through the same rows first, written and read back by the same program, an
L2 round trip) and du (C, fp32); B2 reads dc, z ((nK+1)*D + halo), x, d (2C) and du (C,
fp32), writes dx (C). In all 6C + 2C(fp32) + (2nK+3)*D elements of DRAM traffic, counting
the re-reads of a tile's x and d within a kernel (prenorm statistics, the C loops) as L1/L2
hits: with C = D = 128, K = (3, 5, 7), bf16 that is 4.9 KB per pixel against DESIGN's floor
of 3C = 768 B.
On top come the weight-gradient updates, L2 traffic: per tile of BLOCK_P pixels about
D^2 + 3*C*D/G + sum(k^2)*D fp32 atomics (or load+store pairs when deterministic).
The dc_i and z buffers are the price of not recomputing ``c_i`` on a halo inside B2 (which costs
k^2 times the depthwise work without an on-chip gather). Peak transient memory: ``(nK + 1) * D``
elements in the compute dtype plus ``C`` fp32 per pixel (:func:`workspace_bytes_per_pixel`; and
the gradient partials), freed when the launcher returns.

Image slices: the launcher runs B0-B2 over slices of whole images
(``mslora_kernels.workspace.image_slices``), each slice's z / dc / du at most the workspace
budget (``MSLORA_WORKSPACE_MB``, default 64 MiB; one image at least), the buffers allocated once at
the largest slice and reused. Everything but the weight gradients is per image (pool's sum of
ds0 is per image and consumed within the slice), so slicing changes only the order in which the
weight gradients are summed: they accumulate in the same fp32 buffer across slices (atomics, or
each deterministic program's private row, in slice order).

Weight gradients are reductions over N*H*W, accumulated in fp32:
- ``deterministic=False`` (the default, per the contract): one program per tile, each adding its
  tile's partial sums to one fp32 buffer with ``tl.atomic_add``;
- ``deterministic=True``: a persistent grid of ``min(#tiles, DET_PROGRAMS, partial budget)``
  programs (a function of the shape only, independent of the device), each owning a private
  fp32 slice of the buffer that it updates (load, add, store) over its tiles in a fixed order;
  then a fixed-order sum over the programs (``_bwd_finish_kernel``, row after row). Bitwise
  reproducible run to run; the program count, hence the order of the
  reduction over tiles, does not depend on the device (the per-tile products may still differ
  between GPU generations, whose builds use different MMA instructions and warp counts).

Products: the grouped 1x1s (proj, down, up) are done as dense ``tl.dot`` over C chunks of
BLOCK_C with the block-diagonal weight loaded masked (G times the MMA work of a per-group product,
tensor-core time is not the limit here; it keeps every D-sized tensor one [BLOCK_P, BLOCK_D]
block). Shuffle is folded into the up-projection's column index. Operands go to ``tl.dot`` in the
compute dtype (fp32 with ``input_precision="ieee"``, i.e. no TF32), accumulation is fp32.

Registers (``python -m mslora_kernels.checks.triton_compile --filter mslora_bwd``; tile size,
warps and register cap per D and dtype in ``_blocks``). At D = 128 (BLOCK_D >= 128: tiles of 16
pixels), B0 compiles without spills; B2 without spills in fp16/bf16 on sm_90 (16 B on sm_80,
det with every option), 0-0.83 KB per thread in fp32 (det with every option the most);
B1 spills 0.08-0.12 KB per thread in fp16/bf16 with no option, 0.32-0.39 KB with every option,
0.4-1.8 KB in fp32 (det the most). The K = D products of B1 (t = R s; ds = R^T dt with
dR = dt^T s) take their left operand from a staging copy in the tile's rows of dc_STG (written
later by the per-path loop; the compute dtype, as the product rounds it anyway), in K chunks of
BLOCK_K: an MMA operand spanning K = D held ~64 registers per thread, the largest single cause.
Tried without gain (or gains in one dtype, losses in another): splitting the K operand with
tl.split; the du = P^T da loop staged and moved before the per-path loop (fp32 det -40%,
fp16 +30-60%); reloading z for the gate instead of keeping it; recomputing enhance's v and s
from ehat; 8 warps on sm_90 at 16 pixels; splitting B1 (the per-path part in a kernel of its
own), num_stages=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import MSLoRAOptions, flat_grad_sections, split_flat_grads, weight_shapes
from ..workspace import image_slices, rows
from ._common import MAX_PATHS, kernel_size_slots, nchw_strides, normalize_layout, wrap_triton
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
from .taps import TAP_ALIGN, pack_taps, path_taps

LN_EPS = 1e-6
# Persistent programs of the deterministic mode: a fixed count (2 per SM of an H100), so the
# reduction order, and hence every bit of the result, does not depend on the machine.
DET_PROGRAMS = 264
# ... but no more programs than keep their fp32 partials under 2^23 floats (32 MiB); a function of
# the shape only, never of the machine.
DET_PARTIAL_BUDGET = 1 << 23
BLOCK_C = 32  # channels of x per chunk of the C loops (the K dim of the grouped products)
# software pipelining depth, the same in the launches and the compile check (the check's register,
# spill and shared-memory figures are those of what runs; left out, a launch took Triton's
# default of 3: 88.5 KB of shared memory for fp32 D=128 det B1 where the check had read 67.8 KB)
NUM_STAGES = 2
BLOCK_K = tl.constexpr(32)  # K chunk of the staged (D, D) products (``_mm_staged``)
BLOCK_FINISH = 1024  # gradient elements per program of the finishing kernel
PATHS = tl.constexpr(MAX_PATHS)  # the finishing kernel's kernel-size arguments K0..K3
# The fp32 gradient buffer's sections (mslora_bwd_flat): the kernels' o_* offsets
_BUFFER_SECTIONS = ("pool", "proj.weight", "down.weight", "dw", "pw.weight", "up.weight",
                    "norm.weight", "norm.bias", "enorm.weight", "enorm.bias", "gate.weight",
                    "gate.bias")


fix_interpreter()

# -------------------------------------------------------------------------------------------
# jit helpers
# -------------------------------------------------------------------------------------------


@triton.jit
def _gelu_grad(x):
    """d GELU / dx = Phi(x) + x phi(x), fp32."""
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + \
        x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _mm(a, b, DT: tl.constexpr):
    """[M, K] @ [K, N] on tensor cores: operands in the compute dtype DT, fp32 accumulation."""
    return tl.dot(a.to(DT), b.to(DT), input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def _stage(a, buf_ptr, rows, pm, D, DT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a register tile a [BLOCK_P, BLOCK_D] in the compute dtype (what ``_mm`` rounds its
    operands to anyway) into the program's ``rows`` of a (rows, D) scratch buffer, then a
    barrier: read back in K chunks (``_staged_chunk``), it feeds the products whose K is D
    without an MMA operand spanning all of D (those were the largest share of B1's spills)."""
    dd = tl.arange(0, BLOCK_D)
    tl.store(buf_ptr + rows[:, None] * D + dd[None, :], a.to(DT),
             mask=pm[:, None] & (dd < D)[None, :])
    tl.debug_barrier()


@triton.jit
def _staged_chunk(buf_ptr, rows, pm, kk, D):
    """Columns kk of a staged tile (zero outside the tile and beyond D)."""
    return tl.load(buf_ptr + rows[:, None] * D + kk[None, :],
                   mask=pm[:, None] & (kk < D)[None, :], other=0.0)


@triton.jit
def _w_chunk(w_ptr, kk, dd, sk, sn, D):
    """Rows kk of a (D, D) weight seen as W[k, n] at ``w_ptr + k sk + n sn`` (zero beyond D)."""
    return tl.load(w_ptr + kk[:, None] * sk + dd[None, :] * sn,
                   mask=(kk < D)[:, None] & (dd < D)[None, :], other=0.0)


@triton.jit
def _mm_staged(a, buf_ptr, rows, pm, w_ptr, sk, sn, D, DT: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """a @ W, fp32 accumulation, for a register tile a [BLOCK_P, BLOCK_D] and a (D, D) weight
    (``_w_chunk``), with a staged (``_stage``) and taken in K chunks of BLOCK_K. The staging
    rows are free again when it returns."""
    _stage(a, buf_ptr, rows, pm, D, DT, BLOCK_D)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([a.shape[0], BLOCK_D], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        acc += _mm(_staged_chunk(buf_ptr, rows, pm, kk, D), _w_chunk(w_ptr, kk, dd, sk, sn, D),
                   DT)
    tl.debug_barrier()
    return acc


@triton.jit
def _acc(ptrs, val, mask, DET: tl.constexpr):
    """Add ``val`` into an fp32 gradient buffer: atomically (fast) or load-add-store into the
    program's private slice (deterministic)."""
    if DET:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + val, mask=mask)
    else:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")


@triton.jit
def _acc_rows(ptr, lhs, rhs, row0, STEP: tl.constexpr, dd, D, DT: tl.constexpr,
              DET: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add trans(lhs) @ rhs into rows row0, row0 + STEP, ... of a (D, D) fp32 gradient."""
    rows = row0 + STEP * tl.arange(0, BLOCK_D // STEP)
    msk = (rows < D)[:, None] & (dd < D)[None, :]
    _acc(ptr + rows[:, None] * D + dd[None, :], _mm(tl.trans(lhs), rhs, DT), msk, DET)


@triton.jit
def _u_chunk(x_ptr, ng_ptr, nb_ptr, xpix, pm, cc, C, sxc, mean, rstd, PRENORM: tl.constexpr):
    """u = x or LN_C(x) on a [BLOCK_P, BLOCK_C] chunk (fp32), zero outside the tile / C.
    Also returns x-hat (the normalised x; x itself without prenorm)."""
    cm = cc < C
    msk = pm[:, None] & cm[None, :]
    xv = tl.load(x_ptr + xpix[:, None] + cc[None, :] * sxc, mask=msk, other=0.0).to(tl.float32)
    if PRENORM:
        xh = tl.where(msk, (xv - mean[:, None]) * rstd[:, None], 0.0)
        gam = tl.load(ng_ptr + cc, mask=cm, other=0.0).to(tl.float32)
        bet = tl.load(nb_ptr + cc, mask=cm, other=0.0).to(tl.float32)
        u = tl.where(msk, xh * gam[None, :] + bet[None, :], 0.0)
    else:
        xh = xv
        u = xv
    return u, xh


@triton.jit
def _grp_in_idx(cc, dd, C, D, Cg, Dg):
    """Offsets and mask of a block-diagonal (D, C/G) weight (proj, down) seen as dense [c, d]:
    W[d, c % Cg] where group(c) == group(d). ``cc``/``dd`` are broadcastable 2-D index blocks."""
    off = dd * Cg + cc % Cg
    msk = (cc < C) & (dd < D) & ((cc // Cg) == (dd // Dg))
    return off, msk


@triton.jit
def _grp_up_idx(cc, dd, C, D, Cg, Dg, G, SHUFFLE: tl.constexpr):
    """Offsets and mask of the up weight (C, D/G) seen as a dense [c, d] acting on m (before the
    shuffle): channel d of m is channel k of m' = shuffle(m), k = (d % Dg) * G + d // Dg."""
    if SHUFFLE:
        k = (dd % Dg) * G + dd // Dg
    else:
        k = dd
    off = cc * Dg + k % Dg
    msk = (cc < C) & (dd < D) & ((cc // Cg) == (k // Dg))
    return off, msk


@triton.jit
def _dwconv(z_ptr, dw_ptr, k, woff, zimg, h, w, pm, dd, dmask, H, W, D,
            BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """c = K * z on the tile: a k x k depthwise conv (zero 'same' padding) of the fp32 z buffer
    (pixel-major, D contiguous; ``zimg`` = the image's first pixel row); the taps at ``dw_ptr +
    woff``, tap-major (k*k, D)."""
    r = k // 2
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for ty in range(0, k):
        hh = h + ty - r
        hok = pm & (hh >= 0) & (hh < H)
        for tx in range(0, k):
            ww = w + tx - r
            ok = hok & (ww >= 0) & (ww < W)
            zv = tl.load(z_ptr + (zimg + hh * W + ww)[:, None] * D + dd[None, :],
                         mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            kv = tl.load(dw_ptr + woff + (ty * k + tx) * D + dd, mask=dmask,
                         other=0.0).to(tl.float32)
            acc += zv * kv[None, :]
    return acc


@triton.jit
def _tile_coords(tile, tiles_per_img, HW, W, BLOCK_P: tl.constexpr):
    """Image index n (int64), pixel index q in the image, its (h, w) and the in-image mask."""
    n = (tile // tiles_per_img).to(tl.int64)
    q = (tile % tiles_per_img) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = q < HW
    h = q // W
    w = q % W
    return n, q, pm, h, w


# -------------------------------------------------------------------------------------------
# kernels
# -------------------------------------------------------------------------------------------


@triton.jit
def _bwd_z_kernel(x_ptr, down_ptr, ng_ptr, nb_ptr, z_ptr,
                  C, D, H, W, Cg, Dg, sxn, sxc, sxh, sxw, tiles_per_img,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRENORM: tl.constexpr):
    """B0: z = Q u for one tile of BLOCK_P pixels of one image, written as fp32.

    x_ptr: x with element strides (sxn, sxc, sxh, sxw) (any of the three layouts);
    down_ptr: down.weight (D, C/G); ng/nb: norm.weight/bias (prenorm);
    z_ptr: (N*H*W, D) in the compute dtype.
    Grid: (N * tiles_per_img,). Tile: BLOCK_P consecutive pixels (row-major h, w) x BLOCK_D
    channels; the C loop goes in chunks of BLOCK_C through tl.dot with the block-diagonal weight.
    """
    DT = x_ptr.dtype.element_ty
    HW = H * W
    n, q, pm, h, w = _tile_coords(tl.program_id(0), tiles_per_img, HW, W, BLOCK_P)
    xpix = n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    dd = tl.arange(0, BLOCK_D)
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_P], dtype=tl.float32)
    if PRENORM:
        mean, rstd = ln_c_stats(x_ptr, xpix, pm, C, sxc, BLOCK_P, BLOCK_C)
    z = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        u, xh = _u_chunk(x_ptr, ng_ptr, nb_ptr, xpix, pm, cc, C, sxc, mean, rstd, PRENORM)
        off, msk = _grp_in_idx(cc[:, None], dd[None, :], C, D, Cg, Dg)
        qw = tl.load(down_ptr + off, mask=msk, other=0.0)
        z += _mm(u, qw, DT)
    zrow = n * HW + q
    tl.store(z_ptr + zrow[:, None] * D + dd[None, :], z.to(z_ptr.dtype.element_ty),
             mask=pm[:, None] & (dd < D)[None, :])


@triton.jit
def _bwd_main_kernel(
        x_ptr, go_ptr, z_ptr, zmean_ptr, dc_ptr, du_ptr,
        proj_ptr, down_ptr, up_ptr, pw_ptr, dw_ptr, ks_ptr, woffs_ptr,
        gw_ptr, gb_ptr, ng_ptr, nb_ptr, eg_ptr, eb_ptr,
        g_ptr, o_proj, o_down, o_up, o_pw, o_gw, o_gb, o_eg, o_eb, o_pool, gstride,
        N, C, D, H, W, G, Cg, Dg, NK, STG,
        sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
        ntiles, tiles_per_img,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        PRENORM: tl.constexpr, ENHANCE: tl.constexpr, POOL: tl.constexpr, GATE: tl.constexpr,
        SHUFFLE: tl.constexpr, DET: tl.constexpr):
    """B1: everything from d = grad_out down to dc_i, per tile.

    Inputs: x (strides sx*), grad_out (strides sg*), z ((N*H*W, D) from B0), zmean (fp32
    (N, D), pool), the weights in the compute dtype (dw taps packed by ``taps.pack_taps``:
    path i of size ks[i] at woffs[i], tap-major (k*k, D); ks and woffs int32, written by the
    packing kernel; gate weight (nK, D) and bias (nK,)).
    Outputs: dc ((nK, N*H*W, D), compute dtype), du (fp32 (N*H*W, C): P^T da + Q^T dz_gate)
    and, added
    into the fp32 buffer g_ptr at the o_* offsets (+ pid * gstride when DET), the gradients of
    up, pw, proj, enorm, gate, the gate part of down's, and the per-(n, d) sum of ds0 (pool).
    Grid: DET: a persistent grid, program p takes tiles p, p + #programs, ...; otherwise one
    program per tile. Tile: BLOCK_P consecutive pixels of one image x all D (BLOCK_D >= D).

    The tile's rows of dc_i hold c_i (compute dtype) from the forward recompute until the
    per-path loop reads it back and overwrites it with dc_i, for every path but STG (the smallest
    kernel, ``_staging_path``): its rows stage s and dt for the K = D products in between, and
    the per-path loop recomputes its c (k^2 taps, the fewest).
    """
    DT = x_ptr.dtype.element_ty
    HW = H * W
    NHW = N * HW
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    gb = g_ptr
    if DET:
        gb = g_ptr + pid.to(tl.int64) * gstride
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    for tile in range(pid, ntiles, nprog):
        if DET:
            tl.debug_barrier()  # the previous tile's load-add-stores are visible to all threads
        n, q, pm, h, w = _tile_coords(tile, tiles_per_img, HW, W, BLOCK_P)
        h64 = h.to(tl.int64)
        w64 = w.to(tl.int64)
        xpix = n * sxn + h64 * sxh + w64 * sxw
        gpix = n * sgn + h64 * sgh + w64 * sgw
        zimg = n * HW
        zrow = zimg + q
        srow = STG * NHW + zrow  # the staging rows (dc_STG's) of this tile
        pdm = pm[:, None] & dmask[None, :]

        # ---- recompute the forward on the tile ----
        mean = tl.zeros([BLOCK_P], dtype=tl.float32)
        rstd = tl.zeros([BLOCK_P], dtype=tl.float32)
        if PRENORM:
            mean, rstd = ln_c_stats(x_ptr, xpix, pm, C, sxc, BLOCK_P, BLOCK_C)
        a = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            u, xh = _u_chunk(x_ptr, ng_ptr, nb_ptr, xpix, pm, cc, C, sxc, mean, rstd, PRENORM)
            off, msk = _grp_in_idx(cc[:, None], dd[None, :], C, D, Cg, Dg)
            a += _mm(u, tl.load(proj_ptr + off, mask=msk, other=0.0), DT)
        zc = tl.load(z_ptr + zrow[:, None] * D + dd[None, :], mask=pdm, other=0.0).to(tl.float32)
        s0 = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for i in range(NK):
            k = tl.load(ks_ptr + i)
            woff = tl.multiple_of(tl.load(woffs_ptr + i), TAP_ALIGN)
            c = _dwconv(z_ptr, dw_ptr, k, woff, zimg, h, w, pm, dd, dmask, H, W, D, BLOCK_P,
                        BLOCK_D)
            if i != STG:  # kept for the per-path loop, in the rows dc_i will take
                tl.store(dc_ptr + (i * NHW + zrow)[:, None] * D + dd[None, :],
                         c.to(dc_ptr.dtype.element_ty), mask=pdm)
            e = gelu_fp32(c)
            if GATE:
                gwi = tl.load(gw_ptr + i * D + dd, mask=dmask, other=0.0).to(tl.float32)
                gl = tl.sum(zc * gwi[None, :], axis=1) + tl.load(gb_ptr + i).to(tl.float32)
                e = e * tl.sigmoid(gl)[:, None]
            s0 += e
        if POOL:
            zm = tl.load(zmean_ptr + n * D + dd, mask=dmask, other=0.0)
            s0 += tl.where(dmask, gelu_fp32(zm), 0.0)[None, :]
        if ENHANCE:
            emean = tl.sum(s0, axis=1) / D
            sc = tl.where(dmask[None, :], s0 - emean[:, None], 0.0)
            erstd = 1.0 / tl.sqrt(tl.sum(sc * sc, axis=1) / D + 1e-6)
            ehat = sc * erstd[:, None]
            egam = tl.load(eg_ptr + dd, mask=dmask, other=0.0).to(tl.float32)
            ebet = tl.load(eb_ptr + dd, mask=dmask, other=0.0).to(tl.float32)
            v = ehat * egam[None, :] + ebet[None, :]
            s = gelu_fp32(v)
        else:
            s = s0
        # t = R s: t[p, o] = sum_i s[p, i] R[o, i]; staged through this tile's rows of dc_STG,
        # which hold nothing until the per-path loop below writes dc_STG
        t = _mm_staged(s, dc_ptr, srow, pm, pw_ptr, 1, D, D, DT, BLOCK_K, BLOCK_D)

        # ---- dU = sum_p d (x) m (one C loop), dm = U^T d (unshuffled, a second C loop) ----
        m = a * t
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            gmsk = pm[:, None] & (cc < C)[None, :]
            gch = tl.load(go_ptr + gpix[:, None] + cc[None, :] * sgc, mask=gmsk, other=0.0)
            off, msk = _grp_up_idx(cc[:, None], dd[None, :], C, D, Cg, Dg, G, SHUFFLE)
            _acc(gb + o_up + off, _mm(tl.trans(gch), m, DT), msk, DET)
        dm = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            gmsk = pm[:, None] & (cc < C)[None, :]
            gch = tl.load(go_ptr + gpix[:, None] + cc[None, :] * sgc, mask=gmsk, other=0.0)
            off, msk = _grp_up_idx(cc[:, None], dd[None, :], C, D, Cg, Dg, G, SHUFFLE)
            dm += _mm(gch, tl.load(up_ptr + off, mask=msk, other=0.0), DT)
        da = dm * t
        dt = dm * a
        # ds = R^T dt, and dR[o, i] = sum_p dt[p, o] s[p, i] in blocks of BLOCK_K rows o, both
        # from dt's K chunks read back from the staging rows (so no [D, D] fp32 block and its
        # D^2 pointers are live at once either)
        _stage(dt, dc_ptr, srow, pm, D, DT, BLOCK_D)
        ds = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            dtk = _staged_chunk(dc_ptr, srow, pm, kk, D)
            ds += _mm(dtk, _w_chunk(pw_ptr, kk, dd, D, 1, D), DT)
            _acc(gb + o_pw + kk[:, None] * D + dd[None, :], _mm(tl.trans(dtk), s, DT),
                 (kk < D)[:, None] & dmask[None, :], DET)
        tl.debug_barrier()  # the staging rows are free again (dc_STG is written below)
        if ENHANCE:
            dv = ds * _gelu_grad(v)
            _acc(gb + o_eg + dd, tl.sum(dv * ehat, axis=0), dmask, DET)
            _acc(gb + o_eb + dd, tl.sum(dv, axis=0), dmask, DET)
            dxh = dv * egam[None, :]
            m1 = tl.sum(dxh, axis=1) / D
            m2 = tl.sum(dxh * ehat, axis=1) / D
            ds0 = tl.where(dmask[None, :],
                           erstd[:, None] * (dxh - m1[:, None] - ehat * m2[:, None]), 0.0)
        else:
            ds0 = ds
        if POOL:
            _acc(gb + o_pool + n * D + dd, tl.sum(ds0, axis=0), dmask, DET)

        # ---- per path: dc_i (written), gate gradients ----
        dzg = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for i in range(NK):
            dci = dc_ptr + (i * NHW + zrow)[:, None] * D + dd[None, :]
            if i == STG:
                k = tl.load(ks_ptr + i)
                woff = tl.multiple_of(tl.load(woffs_ptr + i), TAP_ALIGN)
                c = _dwconv(z_ptr, dw_ptr, k, woff, zimg, h, w, pm, dd, dmask, H, W, D,
                            BLOCK_P, BLOCK_D)
            else:  # c_i as the forward recompute left it (each element is read before the
                # store below overwrites it: that store depends on the value read)
                c = tl.load(dci, mask=pdm, other=0.0).to(tl.float32)
            if GATE:
                gwi = tl.load(gw_ptr + i * D + dd, mask=dmask, other=0.0).to(tl.float32)
                gl = tl.sum(zc * gwi[None, :], axis=1) + tl.load(gb_ptr + i).to(tl.float32)
                sig = tl.sigmoid(gl)
                de = ds0 * sig[:, None]
                dg = tl.sum(ds0 * gelu_fp32(c), axis=1) * sig * (1.0 - sig)
                _acc(gb + o_gw + i * D + dd, tl.sum(dg[:, None] * zc, axis=0), dmask, DET)
                # the bias gradient, a scalar, through lane 0 of a D vector
                _acc(gb + o_gb + i + dd * 0, tl.where(dd == 0, tl.sum(dg, axis=0), 0.0),
                     dd == 0, DET)
                dzg += dg[:, None] * gwi[None, :]
            else:
                de = ds0
            tl.store(dci, (de * _gelu_grad(c)).to(dc_ptr.dtype.element_ty), mask=pdm)

        # ---- du_a = P^T da (+ Q^T dz_gate), dP (and dQ's gate part) ----
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            u, xh = _u_chunk(x_ptr, ng_ptr, nb_ptr, xpix, pm, cc, C, sxc, mean, rstd, PRENORM)
            off, msk = _grp_in_idx(cc[None, :], dd[:, None], C, D, Cg, Dg)  # [BLOCK_D, BLOCK_C]
            du = _mm(da, tl.load(proj_ptr + off, mask=msk, other=0.0), DT)
            _acc(gb + o_proj + off, _mm(tl.trans(da), u, DT), msk, DET)
            if GATE:
                du += _mm(dzg, tl.load(down_ptr + off, mask=msk, other=0.0), DT)
                _acc(gb + o_down + off, _mm(tl.trans(dzg), u, DT), msk, DET)
            tl.store(du_ptr + zrow[:, None] * C + cc[None, :], du,
                     mask=pm[:, None] & (cc < C)[None, :])


@triton.jit
def _bwd_dz_kernel(
        x_ptr, go_ptr, gx_ptr, z_ptr, dc_ptr, du_ptr, dzpool_ptr,
        down_ptr, dw_ptr, ks_ptr, woffs_ptr, ng_ptr, nb_ptr,
        g_ptr, o_down, o_dw, o_ng, o_nb, gstride,
        N, C, D, H, W, Cg, Dg, NK,
        sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
        ntiles, tiles_per_img,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        PRENORM: tl.constexpr, POOL: tl.constexpr, DET: tl.constexpr):
    """B2: dz from dc_i by flipped-tap correlation, dK_i, dQ, and dx, per tile.

    Inputs: x (strides sx*), grad_out (sg*), z and dc (buffers of B0/B1, compute dtype), du (fp32
    (N*H*W, C) from B1), dzpool (fp32 (N, D): the pool term of dz, pool only), down.weight, the
    packed dw taps, norm.weight/bias (prenorm).
    Outputs: grad_x (strides sd*), and added into g_ptr (+ pid * gstride when DET) the gradients
    of the dw taps (packed and tap-major like the taps: the D lanes of one tap add to
    neighbouring floats), down (the non-gate part) and norm (prenorm).
    Grid and tile as B1. dz[q] = sum_i sum_o K_i[o] dc_i[q - o];
    dK_i[o] = sum_q dc_i[q] z[q + o] (both need dc_i / z on a halo of (k_i - 1) / 2, read from
    the buffers, L2 resident).
    """
    DT = x_ptr.dtype.element_ty
    HW = H * W
    NHW = N * HW
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    gb = g_ptr
    if DET:
        gb = g_ptr + pid.to(tl.int64) * gstride
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    for tile in range(pid, ntiles, nprog):
        if DET:
            tl.debug_barrier()
        n, q, pm, h, w = _tile_coords(tile, tiles_per_img, HW, W, BLOCK_P)
        h64 = h.to(tl.int64)
        w64 = w.to(tl.int64)
        xpix = n * sxn + h64 * sxh + w64 * sxw
        gpix = n * sgn + h64 * sgh + w64 * sgw
        dpix = n * sdn + h64 * sdh + w64 * sdw
        zimg = n * HW
        zrow = zimg + q
        pdm = pm[:, None] & dmask[None, :]

        dz = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for i in range(NK):
            k = tl.load(ks_ptr + i)
            woff = tl.multiple_of(tl.load(woffs_ptr + i), TAP_ALIGN)
            r = k // 2
            dci = dc_ptr + i * NHW * D
            dcc = tl.load(dci + zrow[:, None] * D + dd[None, :], mask=pdm,
                          other=0.0).to(tl.float32)
            for ty in range(0, k):
                hd = h - (ty - r)
                hz = h + (ty - r)
                hdok = pm & (hd >= 0) & (hd < H)
                hzok = pm & (hz >= 0) & (hz < H)
                for tx in range(0, k):
                    wd = w - (tx - r)
                    wz = w + (tx - r)
                    dok = hdok & (wd >= 0) & (wd < W)
                    zok = hzok & (wz >= 0) & (wz < W)
                    tap = woff + (ty * k + tx) * D + dd
                    kv = tl.load(dw_ptr + tap, mask=dmask, other=0.0).to(tl.float32)
                    dcs = tl.load(dci + (zimg + hd * W + wd)[:, None] * D + dd[None, :],
                                  mask=dok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                    dz += dcs * kv[None, :]
                    zs = tl.load(z_ptr + (zimg + hz * W + wz)[:, None] * D + dd[None, :],
                                 mask=zok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                    _acc(gb + o_dw + tap, tl.sum(dcc * zs, axis=0), dmask, DET)
        if POOL:
            dzp = tl.load(dzpool_ptr + n * D + dd, mask=dmask, other=0.0)
            dz = tl.where(pdm, dz + dzp[None, :], 0.0)

        mean = tl.zeros([BLOCK_P], dtype=tl.float32)
        rstd = tl.zeros([BLOCK_P], dtype=tl.float32)
        m1 = tl.zeros([BLOCK_P], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
        if PRENORM:
            mean, rstd = ln_c_stats(x_ptr, xpix, pm, C, sxc, BLOCK_P, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            cm = cc < C
            pcm = pm[:, None] & cm[None, :]
            u, xh = _u_chunk(x_ptr, ng_ptr, nb_ptr, xpix, pm, cc, C, sxc, mean, rstd, PRENORM)
            off, msk = _grp_in_idx(cc[None, :], dd[:, None], C, D, Cg, Dg)  # [BLOCK_D, BLOCK_C]
            du = tl.load(du_ptr + zrow[:, None] * C + cc[None, :], mask=pcm, other=0.0)
            du += _mm(dz, tl.load(down_ptr + off, mask=msk, other=0.0), DT)
            _acc(gb + o_down + off, _mm(tl.trans(dz), u, DT), msk, DET)
            if PRENORM:
                gam = tl.load(ng_ptr + cc, mask=cm, other=0.0).to(tl.float32)
                _acc(gb + o_ng + cc, tl.sum(du * xh, axis=0), cm, DET)
                _acc(gb + o_nb + cc, tl.sum(du, axis=0), cm, DET)
                m1 += tl.sum(du * gam[None, :], axis=1)
                m2 += tl.sum(du * gam[None, :] * xh, axis=1)
            else:
                go = tl.load(go_ptr + gpix[:, None] + cc[None, :] * sgc, mask=pcm, other=0.0)
                tl.store(gx_ptr + dpix[:, None] + cc[None, :] * sdc,
                         (go.to(tl.float32) + du).to(gx_ptr.dtype.element_ty), mask=pcm)
        if PRENORM:
            # LN_C backward: dx = d + rstd (du gamma - mean(du gamma) - xhat mean(du gamma xhat))
            m1 = m1 / C
            m2 = m2 / C
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                cm = cc < C
                pcm = pm[:, None] & cm[None, :]
                u, xh = _u_chunk(x_ptr, ng_ptr, nb_ptr, xpix, pm, cc, C, sxc, mean, rstd,
                                 PRENORM)
                off, msk = _grp_in_idx(cc[None, :], dd[:, None], C, D, Cg, Dg)
                du = tl.load(du_ptr + zrow[:, None] * C + cc[None, :], mask=pcm, other=0.0)
                du += _mm(dz, tl.load(down_ptr + off, mask=msk, other=0.0), DT)
                gam = tl.load(ng_ptr + cc, mask=cm, other=0.0).to(tl.float32)
                go = tl.load(go_ptr + gpix[:, None] + cc[None, :] * sgc, mask=pcm, other=0.0)
                dx = go.to(tl.float32) + rstd[:, None] * (
                    du * gam[None, :] - m1[:, None] - xh * m2[:, None])
                tl.store(gx_ptr + dpix[:, None] + cc[None, :] * sdc,
                         dx.to(gx_ptr.dtype.element_ty), mask=pcm)


@triton.jit
def _bwd_pool_kernel(g_ptr, o_pool, gstride, NPROG, zmean_ptr, dzpool_ptr, D, HW,
                     BLOCK_D: tl.constexpr):
    """pool's term of dz, one program per image n of the slice: ``dzpool[n] = (sum of ds0 over
    the image) * GELU'(mean z) / (H W)``, fp32 (N, D). The sum of ds0 is B1's per-(n, d) sum in
    the gradient buffer's pool section, over its NPROG rows (the deterministic mode's private
    rows, in row order; one row otherwise); read, it is zeroed for the next slice's B1."""
    n = tl.program_id(0)
    dd = tl.arange(0, BLOCK_D)
    m = dd < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p in range(NPROG):  # p * gstride < 2^31: the rows hold at most DET_PARTIAL_BUDGET floats
        ptrs = g_ptr + p * gstride + o_pool + n * D + dd
        acc += tl.load(ptrs, mask=m, other=0.0)
        tl.store(ptrs, tl.zeros([BLOCK_D], dtype=tl.float32), mask=m)
    zm = tl.load(zmean_ptr + n * D + dd, mask=m, other=0.0)
    tl.store(dzpool_ptr + n * D + dd, acc * _gelu_grad(zm) / HW, mask=m)


@triton.jit
def _bwd_finish_kernel(g_ptr, out_ptr, o_grads, gstride, NPROG, TOTAL, DW0, DWLEN, DWPAD, D,
                       K0, K1, K2, K3, BLOCK: tl.constexpr):
    """Every weight gradient from the fp32 buffer in one pass: summed over its NPROG rows (the
    deterministic mode's private rows, in row order; one row otherwise), cast to the weights'
    dtype, written flat in ``weight_shapes`` order and checkpoint layout (``out_ptr``, TOTAL
    elements). The buffer holds the same gradients in the same order from ``o_grads`` on, but
    the taps' gradient as the taps are packed (``taps.tap_offsets``: tap-major, each path's
    block 16-aligned; DWPAD elements where the checkpoint's take DWLEN). So output element e
    reads element e before the taps (proj, down: e < DW0), e + DWPAD - DWLEN after them, and in
    path i's block (offset r = ch * k^2 + t) the tap-major ``DW0 + woff_i + t * D + ch``."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < TOTAL
    src = tl.where(e < DW0, e, e + (DWPAD - DWLEN))
    start = DW0  # path i's first element in the output
    for i in tl.static_range(PATHS):
        k, woff = path_taps(i, K0, K1, K2, K3, D)
        kk = tl.maximum(k * k, 1)
        r = e - start
        blk = (r >= 0) & (r < D * k * k)
        src = tl.where(blk, DW0 + woff + (r % kk) * D + r // kk, src)
        start += D * k * k
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(NPROG):
        acc += tl.load(g_ptr + p * gstride + o_grads + src, mask=m, other=0.0)
    tl.store(out_ptr + e, acc.to(out_ptr.dtype.element_ty), mask=m)


# -------------------------------------------------------------------------------------------
# launcher
# -------------------------------------------------------------------------------------------


def _blocks(d: int, dtype: torch.dtype, sm90: bool) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_D, num_warps, maxnreg) for rank d and compute dtype.

    BLOCK_D = next power of two >= max(d, 16); BLOCK_P * BLOCK_D = 4096 (BLOCK_P between 16 and
    64) below BLOCK_D = 128, 16 pixels (tl.dot's minimum) from 128 up: halving the tile at
    D = 128 took the spills of B1 from 0.55-1.4 KB to 0.4-0.9 KB per thread in fp16/bf16 and
    from 1.3-14 KB to 1-5 KB in fp32, B2's to 0-0.8 KB, at twice the weight-gradient updates
    per pixel (fp32 products run on CUDA cores with both operands in registers; the MMA
    operands of the K = D products t = R s and ds = R^T dt are the largest share in 16 bits).
    From BLOCK_D = 128 up: 16 warps on sm_90 and newer, 8 before (what spills least in the
    compile check). Below 128, 8 warps: the same tiles as with 4, half of each in a thread's
    registers (sm_90, BLOCK_D = 32: B1's spills per thread fell from 0.96-7.4 KB to 0-2.7 KB in
    fp32 and from 0.04-0.84 KB to 0-0.09 KB in fp16/bf16, B2's fp32 ones from 0.2-2.6 KB to
    0-1.2 KB; BLOCK_D = 16: fp32 B1 from 0.8-3.4 KB to 0-1.3 KB, 16-bit from 0.26 KB to none;
    at BLOCK_D = 64 16 warps helped fp32 a little and cost fp16 plain, so it stays at 8).
    maxnreg (fp32 only; None: ptxas chooses): the register file (64K) over the threads, at most
    255, so that ptxas uses all of it (in fp16/bf16 it already takes them all). B0 takes
    ``_z_maxnreg`` of it. Left alone (compile check, triton 3.6, sm_90 and sm_80), ptxas took 128
    of 255 registers at 8 warps for D = 32's det B1 on sm_80 and det B2 with every option, and
    spilled 1.6-2x as much; 64 of 128 at 16 warps for det B2 with every option (1.4-1.8x). At 16
    warps the cap (128, ptxas's own limit there) costs B1 more spills in all 8 cases with triton
    3.6 (0.08-1.8 KB where ptxas alone spills 0.01-1.5 KB), but with triton 3.9 ptxas alone takes
    64 for det B1 with every option and spills 2.8 KB against the cap's 1.7 KB. Under
    torch.compile, Inductor compiles these kernels without maxnreg (torch 2.11 to 2.15 keep only
    num_warps and num_stages of a user kernel's launch options), so compiled fp32 runs what ptxas
    chooses (``python -m mslora_kernels.checks.triton_compile --filter fp32 --as-inductor``
    prints it); the benchmarks' ``triton-compile`` provider times that.
    """
    bd = max(16, triton.next_power_of_2(d))
    bp = 16 if bd >= 128 else max(16, min(64, 4096 // bd))
    warps = 16 if bd >= 128 and sm90 else 8
    maxnreg = min(255, 65536 // (32 * warps)) if dtype == torch.float32 else None
    return bp, bd, warps, maxnreg


def _staging_path(kernel_sizes) -> int:
    """B1's staging path: the index of the smallest kernel (the first of equals), whose rows of
    the dc buffer stage s and dt, and whose c is therefore recomputed (k^2 taps) where every
    other path's is read back (see ``_bwd_main_kernel``)."""
    return min(range(len(kernel_sizes)), key=lambda i: kernel_sizes[i])


def _z_maxnreg(maxnreg: int | None) -> int | None:
    """B0's register cap: at most 128 (B0 needs about 100; with no cap ptxas took 64 at 16 warps
    and spilled, with 255 it took 255 on sm_80 and spilled)."""
    return None if maxnreg is None else min(maxnreg, 128)


def _check(grad_out, x, weights, o, zmean) -> None:
    """Refuse, before any launch, inputs the kernels do not define."""
    if not isinstance(o, MSLoRAOptions):
        raise TypeError(f"mslora_bwd: o must be MSLoRAOptions, got {type(o).__name__}")
    for name, t in (("x", x), ("grad_out", grad_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mslora_bwd: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in TRITON_DTYPE:
        raise TypeError(f"mslora_bwd: x dtype {x.dtype} not supported; use float32, float16 "
                        "or bfloat16")
    if x.dim() != 4:
        raise ValueError(f"mslora_bwd: x must be 4-D, got shape {tuple(x.shape)}")
    c = x.shape[1] if o.data_format == "channels_first" else x.shape[3]
    if c != o.channels:
        raise ValueError(f"mslora_bwd: x has {c} channels ({o.data_format}), options say "
                         f"{o.channels}")
    if x.numel() == 0:
        raise ValueError(f"mslora_bwd: x is empty, shape {tuple(x.shape)}")
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(f"mslora_bwd: grad_out {tuple(grad_out.shape)} {grad_out.dtype} on "
                         f"{grad_out.device} must match x {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}")
    shapes = weight_shapes(o)
    for name in weight_shapes(o):
        if name not in weights:
            raise ValueError(f"mslora_bwd: weight {name!r} is missing")
        w = weights[name]
        if tuple(w.shape) != shapes[name]:
            raise ValueError(f"mslora_bwd: {name} has shape {tuple(w.shape)}, expected "
                             f"{shapes[name]}")
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"mslora_bwd: {name} is {w.dtype} on {w.device}; the weights must "
                             f"be in the compute dtype {x.dtype} on {x.device}")
    extra = set(weights) - set(weight_shapes(o))
    if extra:
        raise ValueError(f"mslora_bwd: unexpected weights {sorted(extra)} for these options")
    if o.pool and zmean is not None:
        n = x.shape[0]
        if tuple(zmean.shape) != (n, o.rank) or zmean.device != x.device:
            raise ValueError(f"mslora_bwd: zmean must be ({n}, {o.rank}) on {x.device}, got "
                             f"{tuple(zmean.shape)} on {zmean.device}")


def workspace_bytes_per_pixel(o: MSLoRAOptions, dtype: torch.dtype) -> int:
    """The backward's transient bytes per pixel (the module doc's accounting): z and the nK
    dc_i in the compute dtype, du in fp32. What the image slices are budgeted by."""
    return (len(o.kernel_sizes) + 1) * o.rank * dtype.itemsize + 4 * o.channels


def mslora_bwd_flat(grad_out: torch.Tensor, x: torch.Tensor, weights: dict[str, torch.Tensor],
                    o: MSLoRAOptions, zmean: torch.Tensor | None,
                    deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``out = x + H(x)`` (SPEC section 1) for x and every weight.

    Args:
        grad_out: dL/dout, x's shape and dtype (any of the three layouts).
        x: the input, (N, C, H, W) (contiguous or channels_last memory format) or (N, H, W, C)
            for ``o.data_format == "channels_last"``; fp32, fp16 or bf16.
        weights: the checkpoint-named weights in x's dtype (see ``config.weight_shapes``).
        o: the module's options.
        zmean: fp32 (N, D) mean over H, W of z, as the forward saved it (pool); when None under
            pool it is recomputed here.
        deterministic: False (default): weight gradients accumulated with fp32 atomics (fast,
            order-dependent in the last bits). True: bitwise reproducible (persistent grid of
            ``DET_PROGRAMS`` programs with private fp32 partials, fixed-order reduction).

    Returns ``(grad_x, flat)``: grad_x in x's layout, memory format and dtype; flat, every
    weight gradient (accumulated in fp32) in the weights' dtype, flattened and concatenated in
    ``weight_shapes`` order (what the op returns; :func:`mslora_bwd` splits it).
    """
    _check(grad_out, x, weights, o, zmean)
    wt = {k: v.contiguous() for k, v in weights.items()}  # as the forward: the kernels and
    # pack_taps index each weight as row-major
    # The one layout rule (normalize_layout) of the forward and the ops' fake impls, so that
    # grad_x's strides are the ones the fake impl promises.
    x = normalize_layout(x, o.data_format)
    grad_out = normalize_layout(grad_out, o.data_format)
    sx, sg = nchw_strides(x, o.data_format), nchw_strides(grad_out, o.data_format)
    if o.data_format == "channels_last":
        n, h, w, c = x.shape
    else:
        n, c, h, w = x.shape
    d, g = o.rank, o.groups
    cg, dg = c // g, d // g
    nk = len(o.kernel_sizes)
    hw = h * w
    dev = x.device
    f32 = torch.float32
    sm90 = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    bp, bd, warps, maxnreg = _blocks(d, x.dtype, sm90)
    tiles_per_img = triton.cdiv(hw, bp)
    # Slices of whole images, each slice's workspaces within the budget (see the module doc).
    slices = image_slices(n, hw * workspace_bytes_per_pixel(o, x.dtype))
    ns_max = max(n1 - n0 for n0, n1 in slices)
    nhw_max = ns_max * hw

    # every path's taps tap-major in one buffer, and the int32 kernel sizes and offsets the
    # kernels index them by, in one launch (taps.pack_taps)
    dw, _, ks, woffs = pack_taps(wt, o.kernel_sizes, d)

    # The fp32 gradient buffer: the per-(n, d) sum of ds0 (pool) of the images of one slice
    # (zeroed by _bwd_pool_kernel once read), then every gradient in weight_shapes' order, the
    # taps' as packed (one "dw" section). With C and D multiples of 16 every offset is one. The
    # sections of options that are off are empty: their offsets (passed, never read) stay 0.
    offs = dict.fromkeys(_BUFFER_SECTIONS, 0)
    total = ns_max * d if o.pool else 0
    o_grads = total
    sections = flat_grad_sections(o)
    for name, size in sections.items():
        offs[name], total = total, total + (dw.numel() if name == "dw" else size)
    row = triton.cdiv(total, 32) * 32
    if deterministic:
        # One program count for every slice (a program with no tile in a smaller slice adds
        # nothing), so each program's private row sums its tiles slice after slice: a fixed order.
        nprog = min(ns_max * tiles_per_img, DET_PROGRAMS, max(16, DET_PARTIAL_BUDGET // row))
    else:
        nprog = 1  # one row, shared through atomics
    gbuf = torch.zeros((nprog, row), dtype=f32, device=dev)

    # z and dc_i in the compute dtype (as the reference rounds them); du in fp32; allocated once
    # at the largest slice, the leading rows of each used by a slice
    zbuf = torch.empty((nhw_max, d), dtype=x.dtype, device=dev)
    dcbuf = torch.empty((nk * nhw_max * d,), dtype=x.dtype, device=dev)
    dubuf = torch.empty((nhw_max, c), dtype=f32, device=dev)
    dzpool = torch.empty((ns_max, d), dtype=f32, device=dev) if o.pool else gbuf
    grad_x = torch.empty_like(x)
    sgx = nchw_strides(grad_x, o.data_format)

    dummy = wt["pw.weight"]
    ng, nb = (wt["norm.weight"], wt["norm.bias"]) if o.prenorm else (dummy, dummy)
    eg, eb = (wt["enorm.weight"], wt["enorm.bias"]) if o.enhance else (dummy, dummy)
    gw, gbias = (wt["gate.weight"], wt["gate.bias"]) if o.gate else (dummy, dummy)
    zm_all = zmean.to(f32).contiguous() if o.pool and zmean is not None else None

    for n0, n1 in slices:
        # Batch slices of x, grad_out, grad_x: views with the full tensors' strides (sx, sg,
        # sgx), so every kernel addresses image n of the slice at n * sxn from the view's start.
        ns = n1 - n0
        nhw, ntiles = ns * hw, ns * tiles_per_img
        xs, gos, gxs = rows(x, n0, n1), rows(grad_out, n0, n1), rows(grad_x, n0, n1)
        zs, dus = rows(zbuf, 0, nhw), rows(dubuf, 0, nhw)
        dcs = rows(dcbuf, 0, nk * nhw * d).view(nk, nhw, d)
        grid = (nprog,) if deterministic else (ntiles,)
        zm = (rows(zm_all, n0, n1) if zm_all is not None else None) if o.pool else gbuf

        wrap_triton(_bwd_z_kernel)[(ntiles,)](
            xs, wt["down.weight"], ng, nb, zs, c, d, h, w, cg, dg, *sx, tiles_per_img,
            BLOCK_P=bp, BLOCK_C=BLOCK_C, BLOCK_D=bd, PRENORM=o.prenorm, num_warps=warps,
            num_stages=NUM_STAGES, maxnreg=_z_maxnreg(maxnreg), enable_fp_fusion=FP_FUSION)
        if o.pool and zm is None:
            zm = zs.view(ns, hw, d).float().mean(1)

        wrap_triton(_bwd_main_kernel)[grid](
            xs, gos, zs, zm, dcs, dus,
            wt["proj.weight"], wt["down.weight"], wt["up.weight"], wt["pw.weight"], dw, ks, woffs,
            gw, gbias, ng, nb, eg, eb,
            gbuf, offs["proj.weight"], offs["down.weight"], offs["up.weight"], offs["pw.weight"],
            offs["gate.weight"], offs["gate.bias"], offs["enorm.weight"], offs["enorm.bias"],
            offs["pool"], row,
            ns, c, d, h, w, g, cg, dg, nk, _staging_path(o.kernel_sizes), *sx, *sg, ntiles,
            tiles_per_img,
            BLOCK_P=bp, BLOCK_C=BLOCK_C, BLOCK_D=bd, PRENORM=o.prenorm, ENHANCE=o.enhance,
            POOL=o.pool, GATE=o.gate, SHUFFLE=o.shuffle, DET=deterministic, num_warps=warps,
            num_stages=NUM_STAGES, maxnreg=maxnreg, enable_fp_fusion=FP_FUSION)

        dzp = gbuf
        if o.pool:
            dzp = rows(dzpool, 0, ns)
            wrap_triton(_bwd_pool_kernel)[(ns,)](gbuf, offs["pool"], row, nprog, zm, dzp, d, hw,
                                                 BLOCK_D=bd, num_warps=4, num_stages=1,
                                                 enable_fp_fusion=FP_FUSION)

        wrap_triton(_bwd_dz_kernel)[grid](
            xs, gos, gxs, zs, dcs, dus, dzp,
            wt["down.weight"], dw, ks, woffs, ng, nb,
            gbuf, offs["down.weight"], offs["dw"], offs["norm.weight"], offs["norm.bias"], row,
            ns, c, d, h, w, cg, dg, nk, *sx, *sg, *sgx, ntiles, tiles_per_img,
            BLOCK_P=bp, BLOCK_C=BLOCK_C, BLOCK_D=bd, PRENORM=o.prenorm, POOL=o.pool,
            DET=deterministic, num_warps=warps,
            num_stages=NUM_STAGES, maxnreg=maxnreg, enable_fp_fusion=FP_FUSION)

    # every weight gradient in one launch: summed (deterministic), cast, taps turned back
    flat = torch.empty((sum(sections.values()),), dtype=x.dtype, device=dev)
    wrap_triton(_bwd_finish_kernel)[(triton.cdiv(flat.numel(), BLOCK_FINISH),)](
        gbuf, flat, o_grads, row, nprog, flat.numel(), offs["dw"] - o_grads, sections["dw"],
        dw.numel(),
        d, *kernel_size_slots(o.kernel_sizes), BLOCK=BLOCK_FINISH, num_warps=4, num_stages=1,
        enable_fp_fusion=FP_FUSION)
    return grad_x, flat


def mslora_bwd(grad_out: torch.Tensor, x: torch.Tensor, weights: dict[str, torch.Tensor],
               o: MSLoRAOptions, zmean: torch.Tensor | None,
               deterministic: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`mslora_bwd_flat` with the weight gradients as a dict keyed like ``weights``, each
    in its weight's shape and dtype (views of the flat buffer)."""
    grad_x, flat = mslora_bwd_flat(grad_out, x, weights, o, zmean, deterministic)
    return grad_x, split_flat_grads(flat, o)


# -------------------------------------------------------------------------------------------
# compile cases
# -------------------------------------------------------------------------------------------

# The option sets compile_cases() enumerates: every option off, and every option on (the kernels
# take the options as constexprs; any other combination compiles the same code paths).
_OPTION_SETS = (
    {"PRENORM": False, "ENHANCE": False, "POOL": False, "GATE": False, "SHUFFLE": False},
    {"PRENORM": True, "ENHANCE": True, "POOL": True, "GATE": True, "SHUFFLE": True},
)


def _opt_tag(opts: dict) -> str:
    on = [k.lower() for k, v in opts.items() if v]
    return "+".join(on) if on else "plain"


def compile_cases(ranks=COMPILE_RANKS) -> list[CompileCase]:
    """Every configuration the launcher picks for D in ``ranks`` (default COMPILE_RANKS), for fp32,
    fp16 and bf16, both reduction modes, and the option sets in ``_OPTION_SETS``.

    Layouts are not separate cases: all three are the same kernels with runtime element strides.
    Kernel sizes are runtime values (loops over the packed taps), so K does not enter the
    configurations either. BLOCK_C is fixed (32); BLOCK_P, BLOCK_D, num_warps and maxnreg follow
    D, the dtype and the GPU generation (``_blocks``): the configurations of both generations are
    listed (each compiled for both archs).
    """
    cases = []
    i32 = "i32"
    for d, sm90 in ((d, sm90) for d in ranks for sm90 in (False, True)):
        for torch_dt, dt in TRITON_DTYPE.items():
            if sm90 and _blocks(d, torch_dt, True) == _blocks(d, torch_dt, False):
                continue  # the same configuration as before sm_90
            bp, bd, warps, maxnreg = _blocks(d, torch_dt, sm90)
            blocks = {"BLOCK_P": bp, "BLOCK_C": BLOCK_C, "BLOCK_D": bd}
            for prenorm in (False, True):
                sig = {nm: f"*{dt}" for nm in ("x_ptr", "down_ptr", "ng_ptr", "nb_ptr")}
                sig["z_ptr"] = f"*{dt}"
                sig.update({nm: i32 for nm in ("C", "D", "H", "W", "Cg", "Dg", "sxn", "sxc",
                                               "sxh", "sxw", "tiles_per_img")})
                cx = dict(blocks, PRENORM=prenorm)
                sig.update({k: "constexpr" for k in cx})
                cases.append(CompileCase(
                    f"mslora_bwd_z[{dt},D={d},w{warps},{'prenorm' if prenorm else 'plain'}]",
                    _bwd_z_kernel, sig, cx, num_warps=warps, num_stages=NUM_STAGES,
                    maxnreg=_z_maxnreg(maxnreg)))
            for opts in _OPTION_SETS:
                for det in (False, True):
                    tag = f"{dt},D={d},w{warps},{_opt_tag(opts)},{'det' if det else 'atomic'}"
                    sig = {}
                    for nm in ("x_ptr", "go_ptr"):
                        sig[nm] = f"*{dt}"
                    for nm in ("z_ptr", "dc_ptr"):
                        sig[nm] = f"*{dt}"
                    for nm in ("zmean_ptr", "du_ptr"):
                        sig[nm] = "*fp32"
                    for nm in ("proj_ptr", "down_ptr", "up_ptr", "pw_ptr", "dw_ptr"):
                        sig[nm] = f"*{dt}"
                    sig.update({"ks_ptr": "*i32", "woffs_ptr": "*i32"})
                    for nm in ("gw_ptr", "gb_ptr", "ng_ptr", "nb_ptr", "eg_ptr", "eb_ptr"):
                        sig[nm] = f"*{dt}"
                    sig["g_ptr"] = "*fp32"
                    for nm in ("o_proj", "o_down", "o_up", "o_pw", "o_gw", "o_gb", "o_eg",
                               "o_eb", "o_pool", "gstride", "N", "C", "D", "H", "W", "G", "Cg",
                               "Dg", "NK", "STG", "sxn", "sxc", "sxh", "sxw", "sgn", "sgc", "sgh",
                               "sgw", "ntiles", "tiles_per_img"):
                        sig[nm] = i32
                    cx = dict(blocks, **opts, DET=det)
                    sig.update({k: "constexpr" for k in cx})
                    cases.append(CompileCase(f"mslora_bwd_main[{tag}]", _bwd_main_kernel, sig,
                                             cx, num_warps=warps, num_stages=NUM_STAGES,
                                             maxnreg=maxnreg))

                    sig = {nm: f"*{dt}" for nm in ("x_ptr", "go_ptr", "gx_ptr")}
                    for nm in ("z_ptr", "dc_ptr"):
                        sig[nm] = f"*{dt}"
                    for nm in ("du_ptr", "dzpool_ptr"):
                        sig[nm] = "*fp32"
                    sig["down_ptr"] = f"*{dt}"
                    sig["dw_ptr"] = f"*{dt}"
                    sig.update({"ks_ptr": "*i32", "woffs_ptr": "*i32"})
                    sig["ng_ptr"] = f"*{dt}"
                    sig["nb_ptr"] = f"*{dt}"
                    sig["g_ptr"] = "*fp32"
                    for nm in ("o_down", "o_dw", "o_ng", "o_nb", "gstride", "N", "C", "D", "H",
                               "W", "Cg", "Dg", "NK", "sxn", "sxc", "sxh", "sxw", "sgn", "sgc",
                               "sgh", "sgw", "sdn", "sdc", "sdh", "sdw", "ntiles",
                               "tiles_per_img"):
                        sig[nm] = i32
                    cx = dict(blocks, PRENORM=opts["PRENORM"], POOL=opts["POOL"], DET=det)
                    sig.update({k: "constexpr" for k in cx})
                    cases.append(CompileCase(f"mslora_bwd_dz[{tag}]", _bwd_dz_kernel, sig, cx,
                                             num_warps=warps, num_stages=NUM_STAGES,
                                             maxnreg=maxnreg))
    # what D = 128 runs with the usual widths: every pointer and size 16-divisible
    cases += [aligned(c) for c in cases if f"D={ALIGNED_RANK}," in c.name]
    for d in ranks:  # the small kernels: one configuration per BLOCK_D or dtype
        sig = {"g_ptr": "*fp32", "o_pool": i32, "gstride": i32, "NPROG": i32,
               "zmean_ptr": "*fp32", "dzpool_ptr": "*fp32", "D": i32, "HW": i32,
               "BLOCK_D": "constexpr"}
        cases.append(CompileCase(f"mslora_bwd_pool[D={d}]", _bwd_pool_kernel, sig,
                                 {"BLOCK_D": max(16, triton.next_power_of_2(d))}, num_warps=4,
                                 num_stages=1))
    for dt in TRITON_DTYPE.values():
        sig = {"g_ptr": "*fp32", "out_ptr": f"*{dt}"}
        sig.update({nm: i32 for nm in ("o_grads", "gstride", "NPROG", "TOTAL", "DW0", "DWLEN",
                                       "DWPAD", "D", "K0", "K1", "K2", "K3")})
        sig["BLOCK"] = "constexpr"
        cases.append(CompileCase(f"mslora_bwd_finish[{dt}]", _bwd_finish_kernel, sig,
                                 {"BLOCK": BLOCK_FINISH}, num_warps=4,
                                 num_stages=1))
    return cases
