"""The CUDA C++ MSLoRA backend on the GPU: launchers vs the reference (outputs and every
gradient, every dtype, layout, option set and odd shapes, SPEC section 4's tolerances), CUDA vs
Triton, and the module path (opcheck, torch.compile, CUDA graphs). The same kernel bodies are
checked on the CPU by test_cuda_host.py."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from test_cuda_host import _nan_workspaces

from mslora_kernels import MSLoRA, ops
from mslora_kernels.backends import cuda_extension, cuda_unavailable_reason
from mslora_kernels.config import MSLoRAOptions
from mslora_kernels.cuda.mslora import mslora_bwd, mslora_fwd
from mslora_kernels.reference import mslora as reference
from mslora_kernels.testing import check_close

needs_ext = pytest.mark.skipif(cuda_extension() is None,
                               reason=str(cuda_unavailable_reason(torch.device("cuda"))))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last_memory", "nhwc"]
OPTION_SETS = [
    {},
    {"prenorm": True, "enhance": True, "pool": True, "gate": True, "shuffle": True},
    {"gate": True, "shuffle": True},
    {"prenorm": True, "enhance": True},
    {"pool": True},
]
SHAPES = [(2, 40, 13, 9, 24, 4, (3, 5, 7)), (1, 12, 1, 17, 6, 3, (3,)),
          (3, 64, 16, 16, 128, 4, (3, 5, 7))]


def _weights(o: MSLoRAOptions, device):
    m = MSLoRA(o.channels, o.rank, o.groups, o.kernel_sizes, o.prenorm, o.enhance, o.pool,
               o.gate, o.shuffle, o.data_format).to(device)
    with torch.no_grad():
        m.up.weight.normal_(0, 0.2)  # never the zero init
        for name, p in m.named_parameters():
            if name.startswith(("norm", "enorm")):
                p.add_(0.1 * torch.randn_like(p))
    return {k: v.detach() for k, v in m.named_parameters()}


def _input(shape, layout, dtype, device="cuda"):
    n, c, h, w = shape
    x = torch.randn(n, c, h, w, device=device, dtype=dtype)
    if layout == "nhwc":
        return x.permute(0, 2, 3, 1).contiguous()
    if layout == "channels_last_memory":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _ref_grads(x, w, o, gout):
    x = x.detach().requires_grad_(True)
    w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
    out = reference(x, w, o)
    g = torch.autograd.grad(out, [x, *w.values()], gout.to(out.dtype))
    return out.detach(), g


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_cuda_launchers_match_reference(shape, opts, layout, dtype, no_tf32):
    _check_launchers(shape, opts, layout, dtype)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=["odd", "real"])
def test_cuda_lowp_without_tensor_cores(shape, dtype, monkeypatch, no_tf32):
    """MSLORA_CUDA_TENSOR_CORES=0 gives the CUDA-core channel products; also right."""
    monkeypatch.setenv("MSLORA_CUDA_TENSOR_CORES", "0")
    _check_launchers(shape, OPTION_SETS[1], "nchw", dtype)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 200, 11, 13, 40, 2, (3, 5)), (1, 132, 9, 7, 72, 2, (3,))],
                         ids=["c-chunks", "dg36"])
def test_cuda_tensor_core_chunks(shape, layout, dtype, no_tf32):
    """The WMMA products over several K chunks (C/G = 100: four, the last partial), column
    chunks (32, 32, 32, 4 of C/G), bwd_dx's K = 2 D/G = 40 across the da | dz boundary, and
    D/G = 36 > 32 (the up product restages A per column chunk); see test_cuda_host.py's
    TC_SHAPES for the same on the CPU."""
    _check_launchers(shape, OPTION_SETS[1], layout, dtype)


def _check_launchers(shape, opts, layout, dtype):
    n, c, h, w, d, g, ks = shape
    o = MSLoRAOptions(c, d, g, ks, data_format="channels_last" if layout == "nhwc"
                      else "channels_first", **opts)
    w64 = {k: v.double() for k, v in _weights(o, "cuda").items()}
    x64 = _input((n, c, h, w), layout, torch.float64)
    gout64 = torch.randn_like(x64)
    ref, g64 = _ref_grads(x64, w64, o, gout64)
    x, wt, gout = x64.to(dtype), {k: v.to(dtype) for k, v in w64.items()}, gout64.to(dtype)
    base = _ref_grads(x, wt, o, gout) if dtype != torch.float32 else (None, [None] * len(g64))

    out, zmean = mslora_fwd(x, wt, o)
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
    check_close("out", out, ref, dtype, baseline=base[0])
    dx, grads = mslora_bwd(gout, x, wt, o, zmean)
    assert dx.stride() == x.stride()
    check_close("grad x", dx, g64[0], dtype, baseline=base[1][0])
    for (name, gref), gb in zip(zip(w64, g64[1:]), base[1][1:]):
        assert grads[name].dtype == dtype and grads[name].shape == gref.shape
        check_close(f"grad {name}", grads[name], gref, dtype, baseline=gb)


@pytest.mark.gpu
@needs_ext
def test_cuda_backward_deterministic():
    o = MSLoRAOptions(40, 24, 4, gate=True, enhance=True, pool=True, prenorm=True)
    w = _weights(o, "cuda")
    x = torch.randn(2, 40, 13, 9, device="cuda")
    out, zmean = mslora_fwd(x, w, o)
    gout = torch.randn_like(out)
    a = mslora_bwd(gout, x, w, o, zmean, deterministic=True)
    b = mslora_bwd(gout, x, w, o, zmean, deterministic=True)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in w)


@pytest.mark.gpu
@needs_ext
@pytest.mark.skipif(importlib.util.find_spec("mslora_kernels.triton.mslora_fwd") is None,
                    reason="the Triton MSLoRA launchers are not in this tree")
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
def test_cuda_and_triton_agree(opts, no_tf32):
    from mslora_kernels.triton.mslora_bwd import mslora_bwd as triton_bwd
    from mslora_kernels.triton.mslora_fwd import mslora_fwd as triton_fwd

    o = MSLoRAOptions(40, 24, 4, **opts)
    w = _weights(o, "cuda")
    x = torch.randn(2, 40, 13, 9, device="cuda")
    out_c, zm_c = mslora_fwd(x, w, o)
    out_t, zm_t = triton_fwd(x, w, o)
    check_close("out cuda vs triton", out_c, out_t.double(), torch.float32)
    gout = torch.randn_like(out_c)
    dx_c, g_c = mslora_bwd(gout, x, w, o, zm_c)
    dx_t, g_t = triton_bwd(gout, x, w, o, zm_t)
    check_close("grad x cuda vs triton", dx_c, dx_t.double(), torch.float32)
    for k in w:
        check_close(f"grad {k} cuda vs triton", g_c[k], g_t[k].double(), torch.float32)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("slots", [None, 7], ids=["default", "7"])
def test_cuda_bwd_dz_partials_are_bounded(slots, monkeypatch, no_tf32):
    """bwd_dz with more tiles (12 images x 8 x 8 tiles = 768 with 8-row tiles, more with fewer
    rows) than blocks (dz_slots: 4 per SM, or 7, which does not divide 768): its dK / gate partial
    buffers have one row per block, every row written (NaN-filled workspaces), gradients right
    and bitwise equal run to run."""
    import mslora_kernels.cuda.mslora as launcher

    o = MSLoRAOptions(40, 24, 4, gate=True, pool=True, enhance=True)
    w64 = {k: v.double() for k, v in _weights(o, "cuda").items()}
    x64 = torch.randn(12, 40, 64, 64, device="cuda", dtype=torch.float64)
    gout64 = torch.randn_like(x64)
    _, g64 = _ref_grads(x64, w64, o, gout64)
    x, w, gout = x64.float(), {k: v.float() for k, v in w64.items()}, gout64.float()

    made, seen = _nan_workspaces(monkeypatch), {}
    launch, smem_bytes, limit = launcher._gpu(x.device)

    def recording(kernel, dtype, nhwc, ints, ptrs):
        if kernel == "bwd_dz":
            by_ptr = {t.data_ptr(): tuple(t.shape) for t in made}
            seen["rows"] = {k: by_ptr[v][0] for k, v in ptrs.items()
                            if k in ("part_dw", "part_gate_w", "part_gate_b")}
            seen["blocks"], seen["tiles"] = ints["dz_blocks"], ints["tiles"] * ints["N"]
            seen["th"] = ints["TH"]
        launch(kernel, dtype, nhwc, ints, ptrs)

    out, zmean = mslora_fwd(x, w, o)
    runs = [launcher.backward_impl(gout, x, w, o, zmean, recording, smem_bytes, limit,
                                   slots=slots) for _ in range(2)]
    bound = slots or launcher.dz_slots(x.device)
    # the tile rows follow shared memory (launcher.TILE_ROWS): the count follows them
    assert seen["tiles"] == 12 * math.ceil(64 / seen["th"]) * math.ceil(64 / launcher.TILE_W)
    assert seen["tiles"] > bound and seen["blocks"] == bound
    assert set(seen["rows"].values()) == {seen["blocks"]}
    (dx, grads), (dx2, grads2) = runs
    check_close("grad x", dx, g64[0], torch.float32)
    for name, gref in zip(w64, g64[1:]):
        check_close(f"grad {name}", grads[name], gref, torch.float32)
    assert torch.equal(dx, dx2) and all(torch.equal(grads[k], grads2[k]) for k in w)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_backward_peak_memory(layout, monkeypatch):
    """One bf16 backward (C=64, D=128, K=(3,5,7), every option, 16 x 64 x 64 pixels) allocates
    at most workspace_bytes_per_pixel x pixels + workspace_bytes_fixed + its outputs (grad_x,
    the weight gradients) + 16 MiB (the caching allocator's rounding), and at least bwd_tile's
    six D-channel workspaces (z, ds0 fp32, four bf16: 16 D B a pixel; the helper is not loose
    either). One image slice (a budget above the batch): tests/test_slices.py covers slicing."""
    import mslora_kernels.cuda.mslora as launcher
    from mslora_kernels import workspace

    monkeypatch.setenv(workspace.ENV_VAR, "4096")

    n, c, h, w, d = 16, 64, 64, 64, 128
    dtype = torch.bfloat16
    o = MSLoRAOptions(c, d, 4, (3, 5, 7), prenorm=True, enhance=True, pool=True, gate=True,
                      shuffle=True, data_format="channels_last" if layout == "nhwc"
                      else "channels_first")
    wt = {k: v.to(dtype) for k, v in _weights(o, "cuda").items()}
    x = _input((n, c, h, w), layout, dtype)
    gout = torch.randn_like(x)
    out, zmean = mslora_fwd(x, wt, o)
    del out
    warm = mslora_bwd(gout, x, wt, o, zmean)  # extension, cuBLAS handle and workspace
    del warm
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dx, grads = mslora_bwd(gout, x, wt, o, zmean)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before

    _, smem_bytes, limit = launcher._gpu(x.device)
    ints = launcher._plan(o, (n, c, h, w), smem_bytes, limit, dtype)
    npix = n * h * w
    per_px = launcher.workspace_bytes_per_pixel(
        o, dtype, nchw_memory=layout == "nchw", tile_pixels=ints["TH"] * ints["TW"],
        pixel_block=ints["PB"])
    outputs = dx.numel() * dx.element_size() + sum(
        g.numel() * g.element_size() for g in grads.values())
    fixed = launcher.workspace_bytes_fixed(o, launcher.dz_slots(x.device))
    bound = per_px * npix + fixed + outputs + 16 * 2**20
    assert peak <= bound, (
        f"backward peak {peak / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB "
        f"({per_px:.0f} B/pixel x {npix} + fixed {fixed / 2**20:.1f} MiB + outputs "
        f"{outputs / 2**20:.1f} MiB + 16 MiB)")
    assert peak >= (2 * 4 + 4 * 2) * d * npix, f"backward peak {peak / 2**20:.1f} MiB"


def test_cuda_launcher_refuses_cpu_input():
    o = MSLoRAOptions(8, 4, 2)
    w = _weights(o, "cpu")
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        mslora_fwd(torch.randn(1, 8, 3, 3), w, o)


@pytest.mark.gpu
@needs_ext
def test_cuda_launcher_refuses_bad_weights():
    o = MSLoRAOptions(8, 4, 2)
    w = _weights(o, "cuda")
    x = torch.randn(1, 8, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="keys"):
        mslora_fwd(x, {k: v for k, v in w.items() if k != "pw.weight"}, o)
    with pytest.raises(TypeError, match="dtype"):
        mslora_fwd(x, {k: v.half() for k, v in w.items()}, o)
    with pytest.raises(ValueError, match="shape"):
        mslora_fwd(x, {**w, "pw.weight": w["pw.weight"][:2]}, o)
    po = MSLoRAOptions(8, 4, 2, pool=True)
    pw = _weights(po, "cuda")
    _, zmean = mslora_fwd(x, pw, po)
    with pytest.raises(ValueError, match="zmean must be a CUDA tensor"):  # not a raw host pointer
        mslora_bwd(torch.randn_like(x), x, pw, po, zmean.cpu())


# ------------------------------------------ the module path (ops.py's custom ops)
# opcheck of mslora::cuda_fwd / cuda_bwd: tests/test_triton_mslora.py::test_opcheck_gpu[cuda-*]

needs_op = pytest.mark.skipif(ops.mslora_unavailable_reason("cuda") is not None,
                              reason=f"ops: {ops.mslora_unavailable_reason('cuda')}")


def _module(opts, fmt="channels_first"):
    m = MSLoRA(40, 24, 4, data_format=fmt, backend="cuda", **opts).cuda()
    with torch.no_grad():
        m.up.weight.normal_(0, 0.2)
    return m


@pytest.mark.gpu
@needs_ext
@needs_op
@pytest.mark.parametrize("opts", OPTION_SETS[:2], ids=["plain", "all"])
def test_cuda_module_matches_reference(opts, no_tf32):
    m = _module(opts)
    x = torch.randn(2, 40, 13, 9, device="cuda", requires_grad=True)
    out = m(x)
    gout = torch.randn_like(out)
    out.backward(gout)
    w64 = {k: v.detach().double() for k, v in m.named_parameters()}
    ref, g64 = _ref_grads(x.detach().double(), w64, m.options, gout.double())
    check_close("out", out, ref, torch.float32)
    check_close("grad x", x.grad, g64[0], torch.float32)
    for (k, p), gref in zip(m.named_parameters(), g64[1:]):
        check_close(f"grad {k}", p.grad, gref, torch.float32)


@pytest.mark.gpu
@needs_ext
@needs_op
def test_cuda_module_compiles_fullgraph(no_tf32):
    m = _module({"gate": True, "pool": True})
    x = torch.randn(2, 40, 13, 9, device="cuda", requires_grad=True)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)(x)
    check_close("compiled out", compiled, eager.double(), torch.float32)
    compiled.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@needs_ext
@needs_op
def test_cuda_module_cuda_graph(no_tf32):
    m = _module({"enhance": True})
    static_x = torch.randn(2, 40, 13, 9, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            m(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = m(static_x)
    x = torch.randn_like(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    check_close("graph out", static_out, m(x).double(), torch.float32)

