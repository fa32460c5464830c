"""MSLoRA forward and backward on the CUDA C++ kernels of csrc/mslora.cuh (see its header).

Same contract as ``mslora_kernels.triton.mslora_fwd`` / ``mslora_bwd`` (TRITON_CONTRACT.md):

- ``mslora_fwd(x, weights, o) -> (out, zmean)``
- ``mslora_bwd(grad_out, x, weights, o, zmean, deterministic=False) -> (grad_x, grads)``
  (``mslora_bwd_flat``: the weight gradients flat, as the op returns them)

Pass plan (DESIGN.md): ``pack`` writes the weights as the kernels read them (the products'
transposes, the taps, norms and gate in fp32: one launch, :func:`_kernel_weights`); forward =
``prep`` (z = down(u) into a workspace) then ``fwd`` (one
TH x TW pixel tile per block: the multi-scale depthwise + GELU (+gate, +pool, +enhance) sum
from one z halo tile in shared memory, pw, proj, the product, the shuffle by indexing, the
grouped up-projection and the residual). Backward = ``prep`` (recompute z), ``bwd_tile``
(recompute s0, s, t, a; dm, da, dt, ds, ds0), ``bwd_dz`` (dz from ds0 with a halo and z with a
double halo; dK_i and gate partials), ``bwd_dx`` (du, LayerNorm_C backward, dx). For fp16 and
bf16 the channel products run on tensor cores (csrc/tc.cuh; :func:`tensor_cores`): the D x D
pointwise ones (t = pw(s), ds = pw^T(dt)) and the grouped ones between C and D channels (z =
down(u), a = proj(u), y = up(m'), up^T(dout), proj^T(da) + down^T(dz)). Saved for
backward: only x, the weights and zmean.

The pixel-major D-channel workspaces s, m', dt, da and dz are in x's dtype (the reference holds
the same tensors in that dtype), the backward's z and ds0 in fp32 (:data:`FP32_WORKSPACES`), the
forward's z in x's dtype (its only readers there are fwd and prep's gate logits, which the
reference also takes from z in x's dtype): the kernels round once on store and compute in fp32.
:func:`workspace_bytes_per_pixel` gives the backward's peak transient memory per pixel (bf16, D
= 128: 2 KB, against 3 KB with every workspace fp32). The dense weight gradients (proj, down,
pw, up) are GEMMs in x's dtype (torch/cuBLAS, fp32 accumulation) straight over the workspaces
and the activations, written in the weights' layouts; every other weight gradient is a per-tile
(bwd_tile) or per-block (bwd_dz: a bounded number of blocks, each a fixed run of tiles) partial
sum. ``bwd_finish`` sums those partials in a fixed order, takes the GEMMs' results, and writes
every weight gradient flat in x's dtype (one launch); ``bwd_pool`` gives pool's term of dz from
bwd_tile's partials. So the weight gradients are deterministic whatever ``deterministic`` says
(the flag is accepted for the common contract), and a call launches few kernels
(``tests/test_cuda_host.py`` lists them): forward 3 (4 with pool), backward 10 (11 with pool),
where a tensor op per weight and per gradient made them 8-16 and 27-59. Under prenorm in NHWC
memory, bwd_dx also writes u = LN_C(x) pixel-major for the proj / down weight GEMMs (no
LayerNorm launch); NCHW memory adds pixel-major copies for the GEMMs, and under prenorm
LayerNorm's launch.

Image slices: :func:`forward_impl` / :func:`backward_impl` run the pass plan above
(:func:`_forward_slice`, :func:`_backward_slice`) over slices of whole images whose workspaces
(:func:`workspace_bytes_per_pixel`) fit the workspace budget (``MSLORA_WORKSPACE_MB``, default 64
MiB, ``mslora_kernels.workspace``; one image at least). Everything but the weight gradients is
per image; those are summed across slices in fp32, in slice order.

The orchestration (:func:`forward_impl`, :func:`backward_impl`) takes the kernel launcher as an
argument so that tests can run it on the CPU through the host build of the same kernel bodies
(tests/host/mslora_host.cpp), in fp32, fp16 and bf16 (emulated bit for bit, tests/host/lowp_host.h).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ..config import MSLoRAOptions, flat_grad_sections, split_flat_grads, weight_shapes
from ..reference import LN_EPS
from ..triton._common import normalize_layout
from ..workspace import image_slices
from . import _ext

MAX_PATHS = 8     # kMaxPaths in csrc/mslora.cuh
TILE_W = 8        # tile columns of the tile kernels
TILE_ROWS = (8, 4, 2, 1)   # candidate tile rows, largest that fits in shared memory wins
CHUNK = 32        # channel chunk of the z halo tile (fwd, bwd_tile)
CHUNK_DZ = 16     # channel chunk of bwd_dz (two halo tiles per path)
# Pixels per block of prep and of bwd_dx: the largest that fits wins. With tensor cores (16
# bits) each block stages all of down (prep: D C/G weights for PB C activations) or proj and down
# (bwd_dx: 2 D C/G weights for PB 2 D activations: at C = 1024, G = 4, PB = 32, eight times as
# many) for its pixels; bwd_dx takes DX_LARGE_BLOCK pixels where that still fits twice in an
# SM's shared memory (in practice: without prenorm, whose du buffer, csrc's bwd_dx_du, takes
# 4 C bytes a pixel).
PIXEL_BLOCKS = (32, 16, 8, 4, 2, 1)
DX_LARGE_BLOCK = 64
DZ_SLOTS_PER_SM = 4   # bwd_dz blocks (= partial-sum rows) per SM on a GPU
DZ_SLOTS_HOST = 3     # ... on the CPU (host build): small, so that blocks take several tiles

# The D-channel workspaces kept in fp32 whatever x's dtype (csrc/mslora.cuh's Params): z and ds0
# are read with halos by the depthwise passes and feed the weight gradients with few elements
# (dK: D k^2, gate: nk and nk D). Rounded to fp16 / bf16 (every workspace in x's dtype) they gave
# those gradients errors of the reference's own size but independent of it, so past SPEC's 2x
# on some random inputs: gate.bias (nk elements, at any shape) in 3 of 40 seeds at one host
# shape, up to 7x; fp32 z and ds0 keep them at the fp32-workspace levels (max 1.0x there). The
# others (s, mp, dt, da, dz) are in x's dtype, as is the forward's z (prep's z_lowp), which
# feeds no gradient.
FP32_WORKSPACES = ("z", "ds0")

# launch(kernel, dtype_code, nhwc, ints, ptrs) runs one kernel or raises.
Launch = Callable[[str, int, bool, dict, dict], None]
SmemBytes = Callable[[str, dict], int]


def _physical(t: torch.Tensor, o: MSLoRAOptions, nhwc: bool | None = None):
    """(tensor in a kernel layout, nhwc, (N, C, H, W)). ``nhwc`` forces the layout."""
    if o.data_format == "channels_last":
        n, h, w, c = t.shape
        return t.contiguous(), True, (n, c, h, w)
    n, c, h, w = t.shape
    if nhwc is None:  # the layout rule of the Triton launchers and the ops' fake impls
        t = normalize_layout(t, o.data_format)
        nhwc = not t.is_contiguous()
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    return t.contiguous(memory_format=fmt), nhwc, (n, c, h, w)


def _pixel_major(t: torch.Tensor, o: MSLoRAOptions) -> torch.Tensor:
    """(N*H*W, C) view of an activation in its dtype: a copy only where the user's layout is
    channels_first and the memory NCHW."""
    if o.data_format == "channels_first":
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1, t.shape[-1])


# Each section of the kernels' weight buffers (:func:`_kernel_weights`) starts at a multiple of
# this many elements: 128 bytes in 16 bits, as a tensor of its own would.
WEIGHT_ALIGN = 64


def _sections(shapes: Mapping[str, tuple[int, ...]], like: torch.Tensor,
              dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Contiguous tensors of the given shapes and dtype on like's device, views of one buffer
    (one allocation, :func:`_ws`), each starting at a multiple of WEIGHT_ALIGN elements."""
    offs, total = {}, 0
    for k, shape in shapes.items():
        offs[k] = total
        total += math.ceil(math.prod(shape) / WEIGHT_ALIGN) * WEIGHT_ALIGN
    buf = _ws(1, total, like, dtype).view(-1)
    return {k: buf[offs[k]: offs[k] + math.prod(shape)].view(shape) for k, shape in shapes.items()}


def _kernel_weights(weights: Mapping[str, torch.Tensor], o: MSLoRAOptions,
                    launch: Launch) -> dict[str, torch.Tensor]:
    """The kernels' weights (Params of csrc/mslora.cuh), contiguous in their checkpoint shapes:
    the channel products' (proj, down, pw, up) in x's dtype, as given (the kernels read them as
    fp32, exactly), and their transposes (Params::proj_t, down_t, pw_t, up_t), for the products
    whose lanes would read them a row apart; the depthwise taps (packed path after path), norms
    and gate in fp32. The transposes and fp32 copies are written by one launch of the pack
    kernel (a segment each), into two buffers."""
    w = {k: v.detach().contiguous() for k, v in weights.items()}
    d, g, nk = o.rank, o.groups, len(o.kernel_sizes)
    src = w["proj.weight"]
    out = {"proj": src.reshape(d, -1), "down": w["down.weight"].reshape(d, -1),
           "pw": w["pw.weight"].reshape(d, d), "up": w["up.weight"].reshape(o.channels, d // g)}
    products = ("proj", "down", "pw", "up")
    out.update(_sections({f"{k}_t": out[k].shape[::-1] for k in products}, src, src.dtype))
    # the fp32 ones: name -> the weights they come from, in order
    widened = {"dw": [f"dw.{i}.weight" for i in range(nk)]}
    if o.prenorm:
        widened.update(norm_w=["norm.weight"], norm_b=["norm.bias"])
    if o.enhance:
        widened.update(enorm_w=["enorm.weight"], enorm_b=["enorm.bias"])
    if o.gate:
        widened.update(gate_w=["gate.weight"], gate_b=["gate.bias"])
    shapes = {k: (sum(w[n].numel() for n in names),) for k, names in widened.items()}
    if o.gate:
        shapes["gate_w"] = (nk, d)
    out.update(_sections(shapes, src, torch.float32))
    # pack's segments (PackSeg): (src, dst, rows, cols, widen)
    segs = [(out[k].data_ptr(), out[f"{k}_t"].data_ptr(), *out[k].shape, 0) for k in products]
    for k, names in widened.items():
        dst = out[k].reshape(-1)
        for n in names:
            segs.append((w[n].data_ptr(), dst.data_ptr(), 1, w[n].numel(), 1))
            dst = dst[w[n].numel():]
    launch("pack", _ext.DTYPE_CODE[src.dtype], False, {}, {"pack": segs})
    return out


def tensor_cores(dtype: torch.dtype) -> bool:
    """Whether the channel products (D x D and grouped) run on tensor cores (csrc/tc.cuh): for
    fp16 and bf16 activations, unless the environment sets ``MSLORA_CUDA_TENSOR_CORES=0``
    (which gives the fp32 CUDA-core path, for comparison and debugging). fp32 always uses CUDA
    cores."""
    return dtype in (torch.float16, torch.bfloat16) and \
        os.environ.get("MSLORA_CUDA_TENSOR_CORES", "1") != "0"


def _fits_twice(nbytes: int, smem_limit: int) -> bool:
    """Whether two blocks of ``nbytes`` of shared memory fit in one SM (two resident blocks of
    256 threads, as the kernels' __launch_bounds__ assume, hide each other's stage barriers).
    An SM holds about the per-block limit plus 1 KB, and reserves 1 KB per block."""
    return nbytes <= (smem_limit - 2048) // 2


def _tile_rows(kernel: str, chunk: int, ints: dict, o: MSLoRAOptions, smem_bytes: SmemBytes,
               smem_limit: int) -> int:
    """Tile rows of a tile kernel: the largest of TILE_ROWS whose block fits twice in an SM's
    shared memory (:func:`_fits_twice`), else the largest that fits once."""
    sizes = {th: smem_bytes(kernel, {**ints, "TH": th, "CH": chunk}) for th in TILE_ROWS}
    fits = [th for th in TILE_ROWS if sizes[th] <= smem_limit]
    if not fits:
        raise ValueError(
            f"MSLoRA CUDA backend: rank {o.rank} with kernel sizes {o.kernel_sizes} needs "
            f"{sizes[TILE_ROWS[-1]]} bytes of shared memory per block in its {kernel} kernel even "
            f"with one-row tiles; this GPU allows {smem_limit}. Use the Triton or reference "
            f"backend.")
    twice = [th for th in fits if _fits_twice(sizes[th], smem_limit)]
    return (twice or fits)[0]


def _plan(o: MSLoRAOptions, sizes, smem_bytes: SmemBytes, smem_limit: int,
          dtype: torch.dtype) -> dict:
    """The ints every kernel gets: sizes, options, and tiles chosen to fit shared memory."""
    n, c, h, w = sizes
    ints = {"N": n, "C": c, "H": h, "W": w, "D": o.rank, "G": o.groups,
            "ks": list(o.kernel_sizes), "prenorm": int(o.prenorm), "enhance": int(o.enhance),
            "pool": int(o.pool), "gate": int(o.gate), "shuffle": int(o.shuffle), "TW": TILE_W,
            "tc": int(tensor_cores(dtype))}
    need = {kernel: _tile_rows(kernel, chunk, ints, o, smem_bytes, smem_limit)
            for kernel, chunk in (("fwd", CHUNK), ("bwd_tile", CHUNK), ("bwd_dz", CHUNK_DZ))}
    # One tile shape for the backward's tile kernels: their partial-sum buffers are indexed by
    # tile. The forward's own.
    ints["TH"] = min(need["bwd_tile"], need["bwd_dz"])
    ints["TH_fwd"] = need["fwd"]
    # "PB": bwd_dx's (and its norm partials' rows); "PB_prep": prep's
    for key, kernel in (("PB_prep", "prep"), ("PB", "bwd_dx")):
        fit = [pb for pb in PIXEL_BLOCKS if smem_bytes(kernel, {**ints, "PB": pb}) <= smem_limit]
        if not fit:
            raise ValueError(f"MSLoRA CUDA backend: C={c} is too large for the {kernel} kernel's "
                             f"shared memory ({smem_limit} bytes)")
        ints[key] = fit[0]
    large = {**ints, "PB": DX_LARGE_BLOCK}
    if ints["tc"] and _fits_twice(smem_bytes("bwd_dx", large), smem_limit):
        ints["PB"] = DX_LARGE_BLOCK
    ints["tiles"] = math.ceil(h / ints["TH"]) * math.ceil(w / TILE_W)
    return ints


def dz_slots(device: torch.device) -> int:
    """The most blocks of the persistent bwd_dz kernel, so the most rows of its dK / gate
    partial sums, whatever N*H*W: DZ_SLOTS_PER_SM per SM on a GPU (a couple of waves of resident
    blocks), DZ_SLOTS_HOST on the CPU (the host build of the tests)."""
    if device.type == "cuda":
        return DZ_SLOTS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return DZ_SLOTS_HOST


def _ptrs(**tensors) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in tensors.items() if v is not None}


def _ws(rows: int, cols: int, like: torch.Tensor,
        dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (rows, cols) buffer on like's device: a D-channel workspace in like's dtype (the
    kernels' T), or an fp32 one or partial-sum buffer (``dtype=torch.float32``)."""
    return torch.empty(rows, cols, device=like.device, dtype=dtype or like.dtype)


def _workspace(name: str, npix: int, o: MSLoRAOptions, x: torch.Tensor) -> torch.Tensor:
    """D-channel workspace ``name`` (Params of csrc/mslora.cuh) for npix pixels."""
    return _ws(npix, o.rank, x, torch.float32 if name in FP32_WORKSPACES else None)


def _partial(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    return _ws(rows, cols, like, torch.float32)


def _xstats(npix: int, o: MSLoRAOptions, x: torch.Tensor) -> torch.Tensor | None:
    """Under prenorm, the (npix, 2) fp32 LN_C mean and 1/std of x that prep writes and the
    kernels after it read (Params::xstats); else None."""
    return _ws(npix, 2, x, torch.float32) if o.prenorm else None


def _gsig(npix: int, o: MSLoRAOptions, x: torch.Tensor) -> torch.Tensor | None:
    """Under gate, the (npix, nk) fp32 sigmoids of the gates that prep writes and the tile
    kernels after it read (Params::gsig); else None."""
    return _ws(npix, len(o.kernel_sizes), x, torch.float32) if o.gate else None


def workspace_bytes_per_pixel(o: MSLoRAOptions, dtype: torch.dtype, *,
                              nchw_memory: bool | None = None,
                              tile_pixels: int = TILE_ROWS[-1] * TILE_W,
                              pixel_block: int = 32) -> float:
    """Peak transient memory of the CUDA backward (:func:`backward_impl`) per pixel of N*H*W, in
    bytes, beyond its inputs (x, grad_out, zmean, weights) and outputs (grad_x, the weight
    gradients); the fixed part (independent of N*H*W) is :func:`workspace_bytes_fixed`.

    The backward's phases, with b = dtype's size, D = rank, C = channels, z and ds0 fp32
    (:data:`FP32_WORKSPACES`) (the largest wins):

    - prep + bwd_tile: the six D-channel workspaces z, ds0 (4 D each), da, s, m', dt (D b
      each): 8 D + 4 D b;
    - the up gradient: z, ds0, da, m' and grad_out pixel-major (a C b copy if its memory is
      NCHW): 8 D + 2 D b (+ C b);
    - bwd_dz: z, ds0, da, dz: 8 D + 2 D b;
    - bwd_dx and the proj / down gradients: da, dz and u, x pixel-major (a C b copy if NCHW
      memory) or under prenorm LN_C(x) pixel-major (C b: written by bwd_dx in NHWC memory; in
      NCHW the copy's LayerNorm, with its fp32 mean / rstd, 8 B): 2 D b (+ C b) (+ C b + 8);

    plus, all along, the fp32 partial sums that grow with the pixels: pool and enhance
    (3 D fp32 a tile of ``tile_pixels``) and prenorm (2 C fp32 a block of ``pixel_block``
    pixels), under prenorm the kernels' LN_C statistics of x (xstats, 8 B), and under gate
    prep's gate sigmoids (gsig, 4 nk B; freed before bwd_dx).
    ``nchw_memory``: whether x / grad_out are channels_first in NCHW-contiguous memory
    (default: ``o.data_format == "channels_first"``; channels_last memory has no copies). The
    tile and block default to the smallest tile (pessimistic for the tile partials) and a
    pixel block of 32 (under prenorm, where the block matters, the planner takes 32 or more
    unless C is in the thousands); the plan's own
    values (ints "TH" * "TW", "PB" of :func:`_plan`) give the exact figure, up to the partial
    tiles at the images' right and bottom edges.
    """
    b = torch.empty((), dtype=dtype).element_size()
    d, c = o.rank, o.channels
    size = {k: d * (4 if k in FP32_WORKSPACES else b) for k in ("z", "ds0", "da", "s", "mp",
                                                                 "dt", "dz")}
    copy = (o.data_format == "channels_first") if nchw_memory is None else nchw_memory
    gsig = int(o.gate) * 4 * len(o.kernel_sizes)
    phases = [sum(size[k] for k in ("z", "ds0", "da", "s", "mp", "dt")) + gsig,
              sum(size[k] for k in ("z", "ds0", "da", "mp")) + copy * c * b + gsig,
              sum(size[k] for k in ("z", "ds0", "da", "dz")) + gsig,
              size["da"] + size["dz"] + (copy or o.prenorm) * c * b +
              (copy and o.prenorm) * (c * b + 8)]
    partials = (int(o.pool) + 2 * int(o.enhance)) * d * 4 / tile_pixels + \
        int(o.prenorm) * 2 * c * 4 / pixel_block
    return max(phases) + partials + int(o.prenorm) * 8


def workspace_bytes_fixed(o: MSLoRAOptions, slots: int) -> int:
    """The CUDA backward's transient memory that does not grow with N*H*W, in bytes, at most: the
    weights as the kernels read them (:func:`_kernel_weights`: the products' transposes in x's
    dtype, fp32 copies of the others; 4 B a parameter bounds both), the dense weight gradients'
    GEMM results (x's dtype) and, over several image slices, the fp32 sum of every weight
    gradient (4 B a parameter each bounds them: 12 B a parameter in all), and bwd_dz's partial
    rows (dK, gate; ``slots`` rows at most, see :func:`dz_slots`). Small next to
    :func:`workspace_bytes_per_pixel` times the pixels except for tiny batches: 4 per SM on a
    132-SM GPU at D=128, K=(3,5,7) is 22 MB."""
    d, nk = o.rank, len(o.kernel_sizes)
    ktot = sum(k * k for k in o.kernel_sizes)
    params = sum(math.prod(shape) for shape in weight_shapes(o).values())
    return 4 * (3 * params + slots * (d * ktot + o.gate * (nk * d + nk)))


def _forward_slice(x, kw, o: MSLoRAOptions, launch: Launch, smem_bytes: SmemBytes,
                   smem_limit: int, out: torch.Tensor, zmean: torch.Tensor | None) -> None:
    """One slice of images with the given kernel launcher (x already validated, in a kernel
    layout; kw: :func:`_kernel_weights`): writes ``out`` (x's shape and layout) and, under
    pool, ``zmean`` (the slice's rows)."""
    xc, nhwc, sizes = _physical(x, o)
    n, c, h, w = sizes
    ints = _plan(o, sizes, smem_bytes, smem_limit, x.dtype)
    dt = _ext.DTYPE_CODE[x.dtype]
    z = _ws(n * h * w, o.rank, x)  # in x's dtype (z_lowp): see FP32_WORKSPACES
    # prep's LN_C statistics of x (prenorm) and gate sigmoids (gate) for fwd: the tensors held
    # here until it has run (the kernels see only their pointers)
    xstats, gsig = _xstats(n * h * w, o, x), _gsig(n * h * w, o, x)
    stats = _ptrs(xstats=xstats, gsig=gsig)
    launch("prep", dt, nhwc, {**ints, "CH": CHUNK, "PB": ints["PB_prep"], "z_lowp": 1},
           {**stats, **_ptrs(x=xc, z=z, **kw)})
    if o.pool:  # summed in fp32, kept fp32
        torch.mean(z.view(n, h * w, o.rank), 1, dtype=torch.float32, out=zmean)
    launch("fwd", dt, nhwc, {**ints, "TH": ints["TH_fwd"], "CH": CHUNK},
           {**stats, **_ptrs(x=xc, out=out, z=z, zmean=zmean, **kw)})


def _backward_slice(grad_out, x, weights, kw, o: MSLoRAOptions, zmean, launch: Launch,
                    smem_bytes: SmemBytes, smem_limit: int, slots: int | None,
                    dx: torch.Tensor, finish: tuple[dict, dict]) -> None:
    """One slice of images with the given kernel launcher (inputs already validated, in a kernel
    layout; kw: :func:`_kernel_weights` of weights): writes ``dx`` (x's shape and layout), and
    its weight gradients through bwd_finish, whose ints and pointers ``finish`` gives (the
    flat output and the fp32 sum across slices: :func:`backward_flat_impl`). ``slots``: the
    bound on bwd_dz's blocks and partial rows (default :func:`dz_slots` of x's device)."""
    xc, nhwc, sizes = _physical(x, o)
    dc, _, _ = _physical(grad_out, o, nhwc)
    n, c, h, w = sizes
    npix, d, g, nk = n * h * w, o.rank, o.groups, len(o.kernel_sizes)
    ints = _plan(o, sizes, smem_bytes, smem_limit, x.dtype)
    tiles = n * ints["tiles"]
    # bwd_dz is persistent: dz_blocks blocks, each summing the dK / gate partials of its tiles
    # into one row, so those buffers do not grow with N*H*W.
    ints["dz_blocks"] = min(tiles, slots if slots is not None else dz_slots(x.device))
    ktot = sum(k * k for k in o.kernel_sizes)
    dt = _ext.DTYPE_CODE[x.dtype]
    zm = zmean.float().contiguous() if o.pool else None
    # Workspaces (FP32_WORKSPACES fp32, the others x's dtype) in the order they die: s, mp and
    # dt only feed the pw/up weight gradients, which are taken (and the three freed) before dz
    # is allocated; z and ds0 die after bwd_dz (see workspace_bytes_per_pixel).
    ws = {k: _workspace(k, npix, o, x) for k in ("z", "da", "ds0", "s", "mp", "dt")}
    part = {"part_dw": _partial(ints["dz_blocks"], d * ktot, x)}
    if o.pool:
        part["part_pool"] = _partial(tiles, d, x)
    if o.enhance:
        part["part_enorm_w"], part["part_enorm_b"] = _partial(tiles, d, x), _partial(tiles, d, x)
    if o.gate:
        part["part_gate_w"] = _partial(ints["dz_blocks"], nk * d, x)
        part["part_gate_b"] = _partial(ints["dz_blocks"], nk, x)
    blocks = math.ceil(npix / ints["PB"])
    if o.prenorm:
        part["part_norm_w"], part["part_norm_b"] = _partial(blocks, c, x), _partial(blocks, c, x)
    common = _ptrs(x=xc, dout=dc, zmean=zm, **kw, **part)
    # prep's LN_C statistics of x for bwd_tile and bwd_dx (prenorm) and its gate sigmoids for
    # bwd_tile and bwd_dz (gate); the tensors are held here while a kernel may read them (the
    # kernels see only their pointers)
    xstats_t, gsig_t = _xstats(npix, o, x), _gsig(npix, o, x)
    xstats, gsig = _ptrs(xstats=xstats_t), _ptrs(gsig=gsig_t)
    launch("prep", dt, nhwc, {**ints, "CH": CHUNK, "PB": ints["PB_prep"]},
           {**common, **xstats, **gsig, **_ptrs(z=ws["z"])})
    launch("bwd_tile", dt, nhwc, {**ints, "CH": CHUNK},
           {**common, **xstats, **gsig, **_ptrs(**ws)})

    # Dense weight gradients: GEMMs in x's dtype (fp32 accumulation) over the workspaces and
    # the activations, no fp32 copies (grouped ones per group, batched), each written in its
    # weight's layout into gemm; bwd_finish takes them from there.
    cg, dg = c // g, d // g
    gemm = _sections({"proj.weight": (g, dg, cg), "down.weight": (g, dg, cg),
                      "pw.weight": (d, d), "up.weight": (g, cg, dg)}, x, x.dtype)
    torch.mm(ws.pop("dt").t(), ws.pop("s"), out=gemm["pw.weight"])
    dpix = _pixel_major(grad_out, o)
    torch.bmm(dpix.view(npix, g, cg).permute(1, 2, 0),
              ws.pop("mp").view(npix, g, dg).permute(1, 0, 2), out=gemm["up.weight"])
    del dpix
    ws["dz"] = _workspace("dz", npix, o, x)
    pool_dz = None
    if o.pool:  # pool's term of dz per image, from bwd_tile's per-tile sums
        pool_dz = _partial(n, d, x)
        launch("bwd_pool", dt, nhwc, ints, _ptrs(part_pool=part["part_pool"], zmean=zm,
                                                 pool_dz=pool_dz))
    launch("bwd_dz", dt, nhwc, {**ints, "CH": CHUNK_DZ},
           {**common, **gsig, **_ptrs(pool_dz=pool_dz, **ws)})
    del ws["z"], ws["ds0"], gsig_t  # bwd_dx and the GEMMs below need da and dz only
    # u for the proj / down GEMMs, pixel-major: x, or under prenorm LN_C(x) in x's dtype (as the
    # reference computes it). In NHWC memory bwd_dx writes LN_C(x) from its LayerNorm backward's
    # x-hat (Params::u); in NCHW memory, where those stores would not coalesce, x is copied
    # pixel-major and normalised here.
    u = _ws(npix, c, x) if o.prenorm and nhwc else None
    launch("bwd_dx", dt, nhwc, {**ints, "CH": CHUNK},
           {**common, **xstats, **_ptrs(dx=dx, u=u, **ws)})

    if u is None:
        u = _pixel_major(x, o)
        if o.prenorm:
            u = F.layer_norm(u, (c,), weights["norm.weight"], weights["norm.bias"], LN_EPS)
    ug = u.view(npix, g, cg).permute(1, 0, 2)
    for name, ds in (("proj.weight", ws["da"]), ("down.weight", ws["dz"])):
        torch.bmm(ds.view(npix, g, dg).permute(1, 2, 0), ug, out=gemm[name])

    # bwd_finish's segments (GradSeg: source, length, partial rows or 0 for a GEMM's result),
    # in the flat gradients' order; every path's taps one run (part_dw's rows)
    src = {**{k: (v, 0) for k, v in gemm.items()}, "dw": (part["part_dw"], ints["dz_blocks"])}
    for mod, r in (("norm", blocks), ("enorm", tiles), ("gate", ints["dz_blocks"])):
        for kind in ("weight", "bias"):
            if (t := part.get(f"part_{mod}_{kind[0]}")) is not None:
                src[f"{mod}.{kind}"] = (t, r)
    segs = [(src[k][0].data_ptr(), n, src[k][1]) for k, n in flat_grad_sections(o).items()]
    fin_ints, fin_ptrs = finish
    launch("bwd_finish", dt, nhwc, fin_ints, {**fin_ptrs, "grads": segs})


# ------------------------------------------------------------------ image slices


def _slices(x: torch.Tensor, o: MSLoRAOptions, bytes_per_pixel: float) -> list[tuple[int, int]]:
    """The image slices of x's batch under the workspace budget."""
    h, w = x.shape[2:] if o.data_format == "channels_first" else x.shape[1:3]
    return image_slices(x.shape[0], math.ceil(h * w * bytes_per_pixel))


def forward_impl(x, weights, o: MSLoRAOptions, launch: Launch, smem_bytes: SmemBytes,
                 smem_limit: int):
    """(out, zmean) with the given kernel launcher; x already validated. Runs
    :func:`_forward_slice` over slices of whole images whose workspaces (z in x's dtype; xstats,
    gsig fp32) fit the workspace budget (``mslora_kernels.workspace``), each writing its images of
    one ``out``; every value is per image, so slicing changes no result."""
    xc, _, _ = _physical(x, o)  # one layout for every slice and the result
    out = torch.empty_like(xc)
    zmean = _partial(x.shape[0], o.rank, xc) if o.pool else None
    kw = _kernel_weights(weights, o, launch)  # once, for every slice
    per_pixel = xc.element_size() * o.rank + 8 * int(o.prenorm) + \
        4 * len(o.kernel_sizes) * int(o.gate)
    for n0, n1 in _slices(x, o, per_pixel):  # z, xstats, gsig
        _forward_slice(xc[n0:n1], kw, o, launch, smem_bytes, smem_limit, out=out[n0:n1],
                       zmean=zmean[n0:n1] if o.pool else None)
    return out, zmean


def backward_flat_impl(grad_out, x, weights, o: MSLoRAOptions, zmean, launch: Launch,
                       smem_bytes: SmemBytes, smem_limit: int,
                       slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, flat) with the given kernel launcher; inputs already validated. ``flat``: every
    weight gradient flattened, in weight_shapes order, x's dtype (what the op returns).
    ``slots``: the bound on bwd_dz's blocks and partial rows (default :func:`dz_slots` of x's
    device).

    Runs :func:`_backward_slice` over slices of whole images whose workspaces
    (:func:`workspace_bytes_per_pixel`) fit the workspace budget (``mslora_kernels.workspace``),
    each writing its images of one grad_x. Each slice's bwd_finish sums its weight gradients
    (the GEMMs' results, its partial rows in a fixed order) in fp32, adds the earlier slices'
    fp32 sum and keeps it for the next slice; the last one casts to x's dtype once:
    deterministic."""
    if slots is not None and slots < 1:
        raise ValueError(f"MSLoRA CUDA backward: slots must be >= 1, got {slots}")
    xc, nhwc, _ = _physical(x, o)
    gc, _, _ = _physical(grad_out, o, nhwc)
    dx = torch.empty_like(xc)
    kw = _kernel_weights(weights, o, launch)  # once, for every slice
    flat = _ws(1, sum(math.prod(sh) for sh in weight_shapes(o).values()), xc).view(-1)
    slices = _slices(x, o, workspace_bytes_per_pixel(o, x.dtype, nchw_memory=not nhwc))
    acc = _partial(1, flat.numel(), xc).view(-1) if len(slices) > 1 else None
    for i, (n0, n1) in enumerate(slices):
        last = i == len(slices) - 1
        finish = ({"acc_in": int(i > 0), "acc_out": int(not last)},
                  _ptrs(gacc=acc, gout=flat if last else None))
        _backward_slice(gc[n0:n1], xc[n0:n1], weights, kw, o, zmean[n0:n1] if o.pool else None,
                        launch, smem_bytes, smem_limit, slots, dx=dx[n0:n1], finish=finish)
    return dx, flat


def backward_impl(grad_out, x, weights, o: MSLoRAOptions, zmean, launch: Launch,
                  smem_bytes: SmemBytes, smem_limit: int, slots: int | None = None):
    """(grad_x, grads): :func:`backward_flat_impl` with the weight gradients as a dict keyed
    like ``weights`` (views of the flat buffer)."""
    dx, flat = backward_flat_impl(grad_out, x, weights, o, zmean, launch, smem_bytes,
                                  smem_limit, slots)
    return dx, split_flat_grads(flat, o)


# ------------------------------------------------------------------ the public launchers


def check_inputs(op: str, x: torch.Tensor, weights: Mapping[str, torch.Tensor],
                 o: MSLoRAOptions, grad_out: torch.Tensor | None = None) -> None:
    """Everything the kernels assume, refused with a message naming the problem."""
    _ext.check_tensor(op, "x", x, contiguous=False)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D, got shape {tuple(x.shape)}")
    c = x.shape[1] if o.data_format == "channels_first" else x.shape[3]
    if c != o.channels:
        raise ValueError(f"{op}: x has {c} channels for data_format={o.data_format!r}, "
                         f"expected {o.channels}")
    if x.numel() == 0:
        raise ValueError(f"{op}: x is empty, shape {tuple(x.shape)}")
    if len(o.kernel_sizes) > MAX_PATHS:
        raise ValueError(f"{op}: at most {MAX_PATHS} kernel sizes, got {len(o.kernel_sizes)}")
    if grad_out is not None:
        _ext.check_tensor(op, "grad_out", grad_out, dtype=x.dtype, device=x.device,
                          contiguous=False)
        if grad_out.shape != x.shape:
            raise ValueError(f"{op}: grad_out shape {tuple(grad_out.shape)} != x shape "
                             f"{tuple(x.shape)}")
    want = weight_shapes(o)
    if set(weights) != set(want):
        raise ValueError(f"{op}: weights must have exactly the keys {sorted(want)}, got "
                         f"{sorted(weights)}")
    for k, shape in want.items():
        _ext.check_tensor(op, k, weights[k], dtype=x.dtype, device=x.device, contiguous=False)
        if tuple(weights[k].shape) != shape:
            raise ValueError(f"{op}: {k} has shape {tuple(weights[k].shape)}, expected {shape}")


def _gpu(device: torch.device):
    c = _ext.ext(device)
    limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin

    def launch(kernel, dtype, nhwc, ints, ptrs):
        with torch.cuda.device(device):
            code = c.mslora_launch(kernel, dtype, nhwc, ints, ptrs, _ext.stream(device))
        _ext.check_launch(f"mslora {kernel}", code)

    return launch, c.mslora_smem_bytes, limit


def mslora_fwd(x: torch.Tensor, weights: Mapping[str, torch.Tensor],
               o: MSLoRAOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, zmean)``: out = x + H(x) in x's layout and dtype; zmean (N, D) fp32 if pool."""
    check_inputs("mslora_fwd (cuda)", x, weights, o)
    return forward_impl(x, weights, o, *_gpu(x.device))


def mslora_bwd_flat(grad_out: torch.Tensor, x: torch.Tensor,
                    weights: Mapping[str, torch.Tensor], o: MSLoRAOptions,
                    zmean: torch.Tensor | None,
                    deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, flat)``: the weight gradients flattened in weight_shapes order (what the op
    returns); always deterministic (see the module doc)."""
    check_inputs("mslora_bwd (cuda)", x, weights, o, grad_out)
    if o.pool:
        if zmean is None or tuple(zmean.shape) != (x.shape[0], o.rank):
            raise ValueError(
                f"mslora_bwd (cuda): pool needs zmean of shape ({x.shape[0]}, {o.rank})")
        # the kernels read it through a raw pointer: a CPU zmean would be an illegal address
        _ext.check_tensor("mslora_bwd (cuda)", "zmean", zmean, device=x.device, contiguous=False)
    return backward_flat_impl(grad_out, x, weights, o, zmean, *_gpu(x.device))


def mslora_bwd(grad_out: torch.Tensor, x: torch.Tensor, weights: Mapping[str, torch.Tensor],
               o: MSLoRAOptions, zmean: torch.Tensor | None,
               deterministic: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(grad_x, grads)`` per the contract: :func:`mslora_bwd_flat` with the weight gradients
    as a dict keyed like ``weights`` (views of the flat buffer)."""
    grad_x, flat = mslora_bwd_flat(grad_out, x, weights, o, zmean, deterministic)
    return grad_x, split_flat_grads(flat, o)
