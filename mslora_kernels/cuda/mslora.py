"""MSLoRA forward and backward on the CUDA C++ kernels of csrc/mslora.cuh (see its header).

Same contract as ``mslora_kernels.triton.mslora_fwd`` / ``mslora_bwd`` (TRITON_CONTRACT.md):

- ``mslora_fwd(x, weights, o) -> (out, zmean)``
- ``mslora_bwd(grad_out, x, weights, o, zmean, deterministic=False) -> (grad_x, grads)``

Pass plan (DESIGN.md): forward = ``prep`` (z = down(u) into an fp32 workspace) then ``fwd`` (one
TH x TW pixel tile per block: the multi-scale depthwise + GELU (+gate, +pool, +enhance) sum
from one z halo tile in shared memory, pw, proj, the product, the shuffle by indexing, the
grouped up-projection and the residual). Backward = ``prep`` (recompute z), ``bwd_tile``
(recompute s0, s, t, a; dm, da, dt, ds, ds0), ``bwd_dz`` (dz from ds0 with a halo and z with a
double halo; dK_i and gate partials), ``bwd_dx`` (du, LayerNorm_C backward, dx). For fp16 and
bf16 the channel products run on tensor cores (csrc/tc.cuh; :func:`tensor_cores`): the D x D
pointwise ones (t = pw(s), ds = pw^T(dt)) and the grouped ones between C and D channels (z =
down(u), a = proj(u), y = up(m'), up^T(dout), proj^T(da) + down^T(dz)). Saved for
backward: only x, the weights and zmean. The dense weight gradients (proj, down, pw, up) are
fp32 GEMMs (torch/cuBLAS) over the backward's fp32 workspaces; every other weight gradient is a
per-tile (bwd_tile) or per-block (bwd_dz: a bounded number of blocks, each a fixed run of tiles)
partial sum reduced here in a fixed order. So the weight gradients are deterministic
whatever ``deterministic`` says (the flag is accepted for the common contract).

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

from ..config import MSLoRAOptions, weight_shapes
from ..reference import LN_EPS
from ..triton._common import normalize_layout
from ..workspace import image_slices
from . import _ext

MAX_PATHS = 8     # kMaxPaths in csrc/mslora.cuh
TILE_W = 8        # tile columns of the tile kernels
TILE_ROWS = (8, 4, 2, 1)   # candidate tile rows, largest that fits in shared memory wins
CHUNK = 32        # channel chunk of the z halo tile (fwd, bwd_tile)
CHUNK_DZ = 16     # channel chunk of bwd_dz (two halo tiles per path)
PIXEL_BLOCKS = (32, 16, 8, 4, 2, 1)  # pixels per block of prep / bwd_dx
DZ_SLOTS_PER_SM = 4   # bwd_dz blocks (= partial-sum rows) per SM on a GPU
DZ_SLOTS_HOST = 3     # ... on the CPU (host build): small, so that blocks take several tiles

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
    """(N*H*W, C) fp32 view/copy of an activation in the user's layout."""
    if o.data_format == "channels_first":
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1, t.shape[-1]).float()


def _weights32(weights: Mapping[str, torch.Tensor], o: MSLoRAOptions) -> dict[str, torch.Tensor]:
    w = {k: v.detach().float().contiguous() for k, v in weights.items()}
    d, g = o.rank, o.groups
    out = {
        "proj": w["proj.weight"].reshape(d, -1), "down": w["down.weight"].reshape(d, -1),
        "dw": torch.cat([w[f"dw.{i}.weight"].reshape(-1) for i in range(len(o.kernel_sizes))]),
        "pw": w["pw.weight"].reshape(d, d), "up": w["up.weight"].reshape(o.channels, d // g),
    }
    if o.prenorm:
        out["norm_w"], out["norm_b"] = w["norm.weight"], w["norm.bias"]
    if o.enhance:
        out["enorm_w"], out["enorm_b"] = w["enorm.weight"], w["enorm.bias"]
    if o.gate:
        out["gate_w"] = w["gate.weight"].reshape(len(o.kernel_sizes), d)
        out["gate_b"] = w["gate.bias"]
    return out


def tensor_cores(dtype: torch.dtype) -> bool:
    """Whether the channel products (D x D and grouped) run on tensor cores (csrc/tc.cuh): for
    fp16 and bf16 activations, unless the environment sets ``MSLORA_CUDA_TENSOR_CORES=0`` (which gives
    the fp32 CUDA-core path, for comparison and debugging). fp32 always uses CUDA cores."""
    return dtype in (torch.float16, torch.bfloat16) and \
        os.environ.get("MSLORA_CUDA_TENSOR_CORES", "1") != "0"


def _tile_rows(kernel: str, chunk: int, ints: dict, o: MSLoRAOptions, smem_bytes: SmemBytes,
               smem_limit: int) -> int:
    """Tile rows of a tile kernel: the largest of TILE_ROWS whose block fits twice in an SM's
    shared memory (two resident blocks of 256 threads, as the kernels' __launch_bounds__
    assume, hide each other's stage barriers), else the largest that fits once. An SM holds
    about the per-block limit plus 1 KB, and reserves 1 KB per block."""
    sizes = {th: smem_bytes(kernel, {**ints, "TH": th, "CH": chunk}) for th in TILE_ROWS}
    fits = [th for th in TILE_ROWS if sizes[th] <= smem_limit]
    if not fits:
        raise ValueError(
            f"MSLoRA CUDA backend: rank {o.rank} with kernel sizes {o.kernel_sizes} needs "
            f"{sizes[TILE_ROWS[-1]]} bytes of shared memory per block in its {kernel} kernel even "
            f"with one-row tiles; this GPU allows {smem_limit}. Use the Triton or reference "
            f"backend.")
    twice = [th for th in fits if sizes[th] <= (smem_limit - 2048) // 2]
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
    for pb in PIXEL_BLOCKS:
        if smem_bytes("bwd_dx", {**ints, "PB": pb}) <= smem_limit:
            ints["PB"] = pb
            break
    else:
        raise ValueError(f"MSLoRA CUDA backend: C={c} is too large for the bwd_dx kernel's "
                         f"shared memory ({smem_limit} bytes)")
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


def _ws(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(rows, cols, device=like.device, dtype=torch.float32)


def _forward_slice(x, weights, o: MSLoRAOptions, launch: Launch, smem_bytes: SmemBytes,
                   smem_limit: int):
    """(out, zmean) of one slice of images with the given kernel launcher; x already
    validated."""
    xc, nhwc, sizes = _physical(x, o)
    n, c, h, w = sizes
    ints = _plan(o, sizes, smem_bytes, smem_limit, x.dtype)
    dt = _ext.DTYPE_CODE[x.dtype]
    w32 = _weights32(weights, o)
    z = _ws(n * h * w, o.rank, x)
    launch("prep", dt, nhwc, {**ints, "CH": CHUNK}, _ptrs(x=xc, z=z, **w32))
    zmean = z.view(n, h * w, o.rank).mean(1) if o.pool else None
    out = torch.empty_like(xc)
    launch("fwd", dt, nhwc, {**ints, "TH": ints["TH_fwd"], "CH": CHUNK},
           _ptrs(x=xc, out=out, z=z, zmean=zmean, **w32))
    return out, zmean


def _gelu_grad(v: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(v * 0.7071067811865476)) + v * torch.exp(-0.5 * v * v) / math.sqrt(
        2 * math.pi)


def _backward_slice(grad_out, x, weights, o: MSLoRAOptions, zmean, launch: Launch,
                    smem_bytes: SmemBytes, smem_limit: int, slots: int | None = None):
    """(grad_x, grads) of one slice of images with the given kernel launcher; inputs already
    validated. ``slots``: the bound on bwd_dz's blocks and partial rows (default
    :func:`dz_slots` of x's device)."""
    xc, nhwc, sizes = _physical(x, o)
    dc, _, _ = _physical(grad_out, o, nhwc)
    n, c, h, w = sizes
    npix, d, g, nk = n * h * w, o.rank, o.groups, len(o.kernel_sizes)
    ints = _plan(o, sizes, smem_bytes, smem_limit, x.dtype)
    tiles = n * ints["tiles"]
    if slots is not None and slots < 1:
        raise ValueError(f"MSLoRA CUDA backward: slots must be >= 1, got {slots}")
    # bwd_dz is persistent: dz_blocks blocks, each summing the dK / gate partials of its tiles
    # into one row, so those buffers do not grow with N*H*W.
    ints["dz_blocks"] = min(tiles, slots if slots is not None else dz_slots(x.device))
    ktot = sum(k * k for k in o.kernel_sizes)
    dt = _ext.DTYPE_CODE[x.dtype]
    w32 = _weights32(weights, o)
    zm = zmean.float().contiguous() if o.pool else None
    # Workspaces in the order they die: s, mp and dt only feed the pw/up weight gradients,
    # which are taken (and the three freed) before dz is allocated.
    ws = {k: _ws(npix, d, x) for k in ("z", "da", "ds0", "s", "mp", "dt")}
    part = {"part_dw": _ws(ints["dz_blocks"], d * ktot, x)}
    if o.pool:
        part["part_pool"] = _ws(tiles, d, x)
    if o.enhance:
        part["part_enorm_w"], part["part_enorm_b"] = _ws(tiles, d, x), _ws(tiles, d, x)
    if o.gate:
        part["part_gate_w"] = _ws(ints["dz_blocks"], nk * d, x)
        part["part_gate_b"] = _ws(ints["dz_blocks"], nk, x)
    blocks = math.ceil(npix / ints["PB"])
    if o.prenorm:
        part["part_norm_w"], part["part_norm_b"] = _ws(blocks, c, x), _ws(blocks, c, x)
    common = _ptrs(x=xc, dout=dc, zmean=zm, **w32, **part)
    launch("prep", dt, nhwc, {**ints, "CH": CHUNK}, {**common, **_ptrs(z=ws["z"])})
    launch("bwd_tile", dt, nhwc, {**ints, "CH": CHUNK}, {**common, **_ptrs(**ws)})

    # Dense weight gradients: fp32 GEMMs over the workspaces (grouped ones per group).
    cg, dg = c // g, d // g
    grads32 = {"pw.weight": ws.pop("dt").t() @ ws.pop("s")}
    dpix = _pixel_major(grad_out, o)
    grads32["up.weight"] = torch.einsum("pgc,pgj->gcj", dpix.view(npix, g, cg),
                                        ws.pop("mp").view(npix, g, dg))
    del dpix
    ws["dz"] = _ws(npix, d, x)
    pool_dz = None
    if o.pool:
        psum = part["part_pool"].view(n, ints["tiles"], d).sum(1)
        pool_dz = (psum * _gelu_grad(zm) / (h * w)).contiguous()
    launch("bwd_dz", dt, nhwc, {**ints, "CH": CHUNK_DZ},
           {**common, **_ptrs(pool_dz=pool_dz, **ws)})
    dx = torch.empty_like(xc)
    launch("bwd_dx", dt, nhwc, {**ints, "CH": CHUNK}, {**common, **_ptrs(dx=dx, **ws)})

    u = _pixel_major(x, o)
    if o.prenorm:
        u = F.layer_norm(u, (c,), w32["norm_w"], w32["norm_b"], LN_EPS)
    ug = u.view(npix, g, cg)
    grads32["proj.weight"] = torch.einsum("pge,pgj->gej", ws["da"].view(npix, g, dg), ug)
    grads32["down.weight"] = torch.einsum("pge,pgj->gej", ws["dz"].view(npix, g, dg), ug)
    dwsum = part["part_dw"].sum(0)
    off = 0
    for i, k in enumerate(o.kernel_sizes):
        grads32[f"dw.{i}.weight"] = dwsum[off: off + d * k * k]
        off += d * k * k
    if o.prenorm:
        grads32["norm.weight"] = part["part_norm_w"].sum(0)
        grads32["norm.bias"] = part["part_norm_b"].sum(0)
    if o.enhance:
        grads32["enorm.weight"] = part["part_enorm_w"].sum(0)
        grads32["enorm.bias"] = part["part_enorm_b"].sum(0)
    if o.gate:
        grads32["gate.weight"] = part["part_gate_w"].sum(0)
        grads32["gate.bias"] = part["part_gate_b"].sum(0)
    grads = {k: grads32[k].reshape(v.shape).to(v.dtype) for k, v in weights.items()}
    return dx, grads


# ------------------------------------------------------------------ image slices


def workspace_bytes_per_pixel(o: MSLoRAOptions, dtype: torch.dtype) -> int:
    """Transient bytes per pixel of the backward, what the image slices are budgeted by.

    PROVISIONAL (the fp32 accounting of this branch; branch cuda-ws converts the workspaces to
    the activation dtype and defines its own, which replaces this one): the six D-channel fp32
    workspaces (z, da, ds0, s, mp, dt), dz, and the fp32 C-channel copies of x, LN(x) and
    grad_out. The forward (z only) is sliced by the same figure, an overestimate for it."""
    del dtype  # every workspace is fp32 here
    return 4 * (7 * o.rank + 3 * o.channels)


def _slices(x: torch.Tensor, o: MSLoRAOptions) -> list[tuple[int, int]]:
    """The image slices of x's batch under the workspace budget."""
    h, w = x.shape[2:] if o.data_format == "channels_first" else x.shape[1:3]
    return image_slices(x.shape[0], h * w * workspace_bytes_per_pixel(o, x.dtype))


def forward_impl(x, weights, o: MSLoRAOptions, launch: Launch, smem_bytes: SmemBytes,
                 smem_limit: int):
    """(out, zmean) with the given kernel launcher; x already validated. Runs
    :func:`_forward_slice` over slices of whole images whose workspaces fit the workspace
    budget (``mslora_kernels.workspace``); every value is per image, so slicing changes no
    result. With several slices, each slice's out and zmean are copied into the batch's."""
    slices = _slices(x, o)
    xc, _, _ = _physical(x, o)  # one layout for every slice and the result
    if len(slices) == 1:
        return _forward_slice(xc, weights, o, launch, smem_bytes, smem_limit)
    out = torch.empty_like(xc)
    zmean = x.new_empty((x.shape[0], o.rank), dtype=torch.float32) if o.pool else None
    for n0, n1 in slices:
        out_s, zm_s = _forward_slice(xc[n0:n1], weights, o, launch, smem_bytes, smem_limit)
        out[n0:n1].copy_(out_s)
        if o.pool:
            zmean[n0:n1].copy_(zm_s)
        del out_s, zm_s
    return out, zmean


def backward_impl(grad_out, x, weights, o: MSLoRAOptions, zmean, launch: Launch,
                  smem_bytes: SmemBytes, smem_limit: int, slots: int | None = None):
    """(grad_x, grads) with the given kernel launcher; inputs already validated. ``slots``:
    the bound on bwd_dz's blocks and partial rows (default :func:`dz_slots` of x's device).

    Runs :func:`_backward_slice` over slices of whole images whose workspaces fit the workspace
    budget (``mslora_kernels.workspace``). Every slice gets the weights in fp32 (what the
    kernels take anyway, so no value changes) and so returns fp32 weight gradients, its own
    partial sums (dz_blocks rows, tiles, pixel blocks) already reduced in a fixed order; they
    are summed slice after slice in fp32 and cast to the weights' dtype once: deterministic."""
    if slots is not None and slots < 1:
        raise ValueError(f"MSLoRA CUDA backward: slots must be >= 1, got {slots}")
    slices = _slices(x, o)
    xc, nhwc, _ = _physical(x, o)
    gc, _, _ = _physical(grad_out, o, nhwc)
    w32 = {k: v.float() for k, v in weights.items()}
    dx = total = None
    for n0, n1 in slices:
        zm = zmean[n0:n1] if o.pool else None
        dx_s, g_s = _backward_slice(gc[n0:n1], xc[n0:n1], w32, o, zm, launch, smem_bytes,
                                    smem_limit, slots)
        if len(slices) == 1:
            dx = dx_s
        else:
            if dx is None:
                dx = torch.empty_like(xc)
            dx[n0:n1].copy_(dx_s)
        total = g_s if total is None else {k: total[k] + g_s[k] for k in total}
        del dx_s, g_s
    return dx, {k: total[k].to(v.dtype) for k, v in weights.items()}


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
    if x.shape[0] > 65535:
        raise ValueError(f"{op}: batch {x.shape[0]} exceeds the CUDA grid limit 65535")
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


def mslora_bwd(grad_out: torch.Tensor, x: torch.Tensor, weights: Mapping[str, torch.Tensor],
               o: MSLoRAOptions, zmean: torch.Tensor | None,
               deterministic: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(grad_x, grads)`` per the contract; always deterministic (see the module doc)."""
    check_inputs("mslora_bwd (cuda)", x, weights, o, grad_out)
    if o.pool and (zmean is None or tuple(zmean.shape) != (x.shape[0], o.rank)):
        raise ValueError(f"mslora_bwd (cuda): pool needs zmean of shape ({x.shape[0]}, {o.rank})")
    return backward_impl(grad_out, x, weights, o, zmean, *_gpu(x.device))
