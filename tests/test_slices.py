"""The fused launchers over image slices (mslora_kernels.workspace): a small workspace budget
cuts the batch into several slices of whole images (uneven ones included); the forward must be
bitwise the unsliced forward, the backward's grad_x bitwise the unsliced grad_x and the weight
gradients (sums over the batch, now summed slice by slice) within fp32 rounding of the unsliced
ones, and everything within SPEC's tolerance of the float64 reference. pool (a per-image mean,
the option slicing could break), gate and prenorm are on. Triton runs under the interpreter,
CUDA through the host build of its kernels (fp32, fp16 and bf16 both). The GPU test checks that
the slices bound the backward's peak memory.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_cuda_host import _launcher, _module, _reference_checker
from test_cuda_host import host as _compiled_host  # noqa: F401 (a fixture, by this name here)

from mslora_kernels import workspace

SLICE_OPTS = {"prenorm": True, "pool": True, "gate": True}
ALL_ON = {"prenorm": True, "enhance": True, "pool": True, "gate": True, "shuffle": True}
# (N, images per slice) -> slices: (3, 2) -> 2 + 1, (5, 2) -> 2 + 2 + 1
SHAPE = dict(c=40, h=13, w=9, d=24, g=4, ks=(3, 5))


@pytest.fixture
def per_slice(monkeypatch):
    """``set(k)``: every launcher's image_slices gives at most k images a slice (as a budget of
    k images would), whatever their byte accounting; ``set(None)`` restores one slice for small
    batches. Returns the list of slice lists the launchers used."""
    seen = []
    real = workspace.image_slices
    state = {"k": None}

    def fake(n, bytes_per_image, budget=None):
        k = state["k"]
        got = real(n, bytes_per_image, budget) if k is None else \
            real(n, max(1, bytes_per_image), budget=k * max(1, bytes_per_image))
        seen.append(got)
        return got

    import mslora_kernels.cuda.mslora as cuda_launcher
    import mslora_kernels.triton.mslora_bwd as tri_bwd
    import mslora_kernels.triton.mslora_fwd as tri_fwd

    for mod in (tri_fwd, tri_bwd, cuda_launcher):
        monkeypatch.setattr(mod, "image_slices", fake)

    def set_k(k):
        state["k"] = k
        seen.clear()
        return seen

    return set_k


def _input(n, c, h, w, layout, dtype):
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    if layout == "nhwc":
        x = x.permute(0, 2, 3, 1).contiguous()
    elif layout == "nchw_cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


def _case(n, layout, dtype, opts):
    fmt = "channels_last" if layout == "nhwc" else "channels_first"
    s = SHAPE
    m = _module(s["c"], s["d"], s["g"], s["ks"], opts, fmt)
    x = _input(n, s["c"], s["h"], s["w"], layout, dtype)
    wt = {k: v.detach().to(dtype) for k, v in m.named_parameters()}
    return m.options, x, wt, torch.randn_like(x)


def _check_sliced(dtype, o, x, wt, gout, unsliced, sliced):
    """sliced vs unsliced (bitwise out, zmean, grad_x; weight gradients to fp32 rounding, which
    in fp16/bf16 outputs is at most an ulp of the stored dtype) and sliced vs the reference."""
    (out0, zm0, dx0, g0), (out1, zm1, dx1, g1) = unsliced, sliced
    assert torch.equal(out1, out0) and out1.stride() == out0.stride()
    assert (zm0 is None and zm1 is None) or torch.equal(zm1, zm0)
    assert torch.equal(dx1, dx0) and dx1.stride() == dx0.stride()
    assert set(g1) == set(g0) == set(wt)
    rtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for k in wt:
        assert g1[k].dtype == dtype and g1[k].shape == wt[k].shape
        torch.testing.assert_close(g1[k], g0[k], rtol=rtol, atol=rtol * g0[k].abs().max().item(),
                                   msg=lambda m, k=k: f"grad {k} sliced vs unsliced: {m}")
    _reference_checker(x, wt, o, gout)(out1, dx1, g1)


def _uneven(slices_seen, n):
    """Every launch sequence was cut into >= 2 slices, some of different sizes when 2 doesn't
    divide n."""
    assert slices_seen, "the launchers did not ask for image slices"
    for sl in slices_seen:
        sizes = [b - a for a, b in sl]
        assert len(sl) >= 2 and sum(sizes) == n, sl
        assert max(sizes) <= 2


# ------------------------------------------------------------------------------- Triton


def _triton_run(o, x, wt, gout, deterministic=False):
    from mslora_kernels.triton.mslora_bwd import mslora_bwd
    from mslora_kernels.triton.mslora_fwd import mslora_fwd

    out, zmean = mslora_fwd(x, wt, o)
    dx, grads = mslora_bwd(gout, x, wt, o, zmean, deterministic)
    return out, zmean, dx, grads


TRITON_CASES = [(3, "nchw_cl", torch.float32), (5, "nhwc", torch.float32),
                (3, "nchw", torch.float16), (3, "nhwc", torch.float16),
                (3, "nchw_cl", torch.bfloat16)]


@pytest.mark.interpreter
@pytest.mark.parametrize("n,layout,dtype", TRITON_CASES,
                         ids=[f"n{n}-{lay}-{str(dt)[6:]}" for n, lay, dt in TRITON_CASES])
def test_triton_slices_match_unsliced_and_reference(per_slice, n, layout, dtype):
    o, x, wt, gout = _case(n, layout, dtype, SLICE_OPTS)
    per_slice(None)
    unsliced = _triton_run(o, x, wt, gout)
    seen = per_slice(2)
    sliced = _triton_run(o, x, wt, gout)
    _uneven(seen, n)
    _check_sliced(dtype, o, x, wt, gout, unsliced, sliced)


@pytest.mark.interpreter
def test_triton_deterministic_slices_are_bitwise_reproducible(per_slice):
    n = 5
    o, x, wt, gout = _case(n, "nchw_cl", torch.float32, ALL_ON)
    per_slice(None)
    unsliced = _triton_run(o, x, wt, gout, deterministic=True)
    seen = per_slice(2)
    a = _triton_run(o, x, wt, gout, deterministic=True)
    b = _triton_run(o, x, wt, gout, deterministic=True)
    _uneven(seen, n)
    assert torch.equal(a[2], b[2]) and all(torch.equal(a[3][k], b[3][k]) for k in wt)
    _check_sliced(torch.float32, o, x, wt, gout, unsliced, a)


@pytest.mark.interpreter
def test_triton_op_autograd_over_slices(per_slice):
    """Through the op layer (torch.library triton_op + autograd): the forward's zmean, sliced,
    reaches the sliced backward."""
    from mslora_kernels.ops import mslora

    o, x, wt, gout = _case(3, "nchw", torch.float32, SLICE_OPTS)

    def run():
        xr = x.clone().requires_grad_()
        wr = {k: v.clone().requires_grad_() for k, v in wt.items()}
        out = mslora(xr, wr, o, "triton")
        out.backward(gout)
        return out.detach(), None, xr.grad, {k: v.grad for k, v in wr.items()}

    per_slice(None)
    unsliced = run()
    seen = per_slice(2)
    sliced = run()
    _uneven(seen, 3)
    _check_sliced(torch.float32, o, x, wt, gout, unsliced, sliced)


# --------------------------------------------------------------------- CUDA (host build)


@pytest.fixture(scope="session")
def cuda_host(request):
    """test_cuda_host's host build of the CUDA kernels."""
    return request.getfixturevalue("_compiled_host")


def _cuda_device_run(o, x, wt, gout):
    from mslora_kernels.cuda.mslora import mslora_bwd, mslora_fwd

    out, zmean = mslora_fwd(x, wt, o)
    dx, grads = mslora_bwd(gout, x, wt, o, zmean)
    return out, zmean, dx, grads


def _cuda_run(host, o, x, wt, gout):
    from mslora_kernels.cuda.mslora import backward_impl, forward_impl

    launcher = _launcher(host, 227 * 1024)
    out, zmean = forward_impl(x, wt, o, *launcher)
    dx, grads = backward_impl(gout, x, wt, o, zmean, *launcher)
    return out, zmean, dx, grads


CUDA_CASES = [(n, lay, dt) for dt in (torch.float32, torch.float16, torch.bfloat16)
              for n, lay in ((3, "nchw"), (5, "nhwc"), (3, "nchw_cl"))]


@pytest.mark.parametrize("n,layout,dtype", CUDA_CASES,
                         ids=[f"n{n}-{lay}-{str(dt)[6:]}" for n, lay, dt in CUDA_CASES])
def test_cuda_host_slices_match_unsliced_and_reference(cuda_host, per_slice, n, layout,
                                                       dtype):
    o, x, wt, gout = _case(n, layout, dtype, SLICE_OPTS)
    per_slice(None)
    unsliced = _cuda_run(cuda_host, o, x, wt, gout)
    seen = per_slice(2)
    sliced = _cuda_run(cuda_host, o, x, wt, gout)
    _uneven(seen, n)
    _check_sliced(dtype, o, x, wt, gout, unsliced, sliced)


def test_cuda_host_slices_are_bitwise_reproducible(cuda_host, per_slice):
    o, x, wt, gout = _case(5, "nchw", torch.bfloat16, ALL_ON)
    seen = per_slice(2)
    a = _cuda_run(cuda_host, o, x, wt, gout)
    b = _cuda_run(cuda_host, o, x, wt, gout)
    _uneven(seen, 5)
    assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))
    assert all(torch.equal(a[3][k], b[3][k]) for k in wt)


# ------------------------------------------------------------------------------- GPU


def _peak_bwd(bwd, budget_mb, monkeypatch):
    """Bytes allocated at the backward's peak beyond what existed before it. One backward runs
    first, unmeasured: the first GEMM on the stream allocates cuBLAS's workspace (32 MiB on
    sm_90) through the caching allocator, which must not count as the backward's."""
    monkeypatch.setenv(workspace.ENV_VAR, str(budget_mb))
    bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = bwd()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backward_peak_memory_stays_within_budget(backend, monkeypatch):
    """ResNet-stage-like shape, bf16: with an 8 MiB (Triton) / 32 MiB (CUDA) budget the
    backward's peak transient memory is at most the largest slice's accounted
    workspace (>= the budget only when one image exceeds it) + its outputs (grad_x, the weight
    gradients) + slack for the small partial buffers; an unsliced run (a budget above the whole
    batch) exceeds that bound, so the measurement sees the slicing."""
    from mslora_kernels.ops import mslora_unavailable_reason

    reason = mslora_unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    n, c, h, w, d = 16, 64, 56, 56, 128
    m = _module(c, d, 4, (3, 5, 7), SLICE_OPTS, "channels_first")
    dev, dt = torch.device("cuda"), torch.bfloat16
    wt = {k: v.detach().to(dev, dt) for k, v in m.named_parameters()}
    x = torch.randn(n, c, h, w, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
    gout = torch.randn_like(x)
    o = m.options
    if backend == "triton":
        from mslora_kernels.triton.mslora_bwd import mslora_bwd, workspace_bytes_per_pixel
        from mslora_kernels.triton.mslora_fwd import mslora_fwd
        budget_mb, per_pixel, fixed = 8, workspace_bytes_per_pixel(o, dt), 0
    else:
        from mslora_kernels.cuda import mslora as cu
        mslora_bwd, mslora_fwd = cu.mslora_bwd, cu.mslora_fwd
        # x has channels_last memory: no NCHW copies; bwd_dz's partial rows do not grow with
        # the pixels
        budget_mb = 32
        per_pixel = cu.workspace_bytes_per_pixel(o, dt, nchw_memory=False)
        fixed = cu.workspace_bytes_fixed(o, cu.dz_slots(dev))
    _, zmean = mslora_fwd(x, wt, o)
    per_image = math.ceil(h * w * per_pixel)
    slices = workspace.image_slices(n, per_image, budget=budget_mb << 20)
    assert len(slices) > 2
    largest = max(b - a for a, b in slices) * per_image
    outputs = x.numel() * x.element_size() + sum(v.numel() * 4 for v in wt.values())
    slack = 4 << 20
    bound = largest + fixed + outputs + slack

    peak, (dx, grads) = _peak_bwd(lambda: mslora_bwd(gout, x, wt, o, zmean), budget_mb,
                                  monkeypatch)
    assert peak <= bound, f"{backend}: backward peak {peak / 2**20:.1f} MiB > bound " \
                          f"{bound / 2**20:.1f} MiB (largest slice {largest / 2**20:.1f} MiB)"
    del dx, grads
    peak_all, _ = _peak_bwd(lambda: mslora_bwd(gout, x, wt, o, zmean), 1 << 20, monkeypatch)
    assert peak_all > bound, "an unsliced backward should exceed the sliced bound at this shape"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_torch_compile_fullgraph_over_slices(backend, per_slice, no_tf32, monkeypatch):
    """torch.compile(fullgraph=True) of the module with the launchers cut into uneven slices
    (the slicing loop runs at trace time: static shapes, batch-slice views passed to the
    kernels, outputs written into slices of one tensor): output, grad x and the deterministic
    weight gradients as eager's unsliced run, to fp32 rounding."""
    from mslora_kernels.ops import mslora_unavailable_reason

    reason = mslora_unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    # The slicing happens at trace time, and Inductor's and AOTAutograd's on-disk caches (shared
    # by the xdist workers and by re-runs on the machine) would serve a graph traced before,
    # with no call to image_slices: trace afresh.
    monkeypatch.setattr(torch.compiler.config, "force_disable_caches", True)
    s = SHAPE
    m = _module(s["c"], s["d"], s["g"], s["ks"], ALL_ON, "channels_first").float().cuda()
    m.backend, m.deterministic = backend, True
    x = torch.randn(3, s["c"], s["h"], s["w"], device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    gout = torch.randn_like(x)

    def run(mod):
        xr = x.clone().requires_grad_()
        mod.zero_grad(set_to_none=True)
        out = mod(xr)
        out.backward(gout)
        return out.detach(), xr.grad, {k: p.grad.clone() for k, p in m.named_parameters()}

    per_slice(None)
    out0, dx0, g0 = run(m)
    seen = per_slice(2)
    out1, dx1, g1 = run(torch.compile(m, fullgraph=True))
    _uneven(seen, 3)
    # Not bitwise: Inductor compiles the torch ops between the kernels its own way (on CUDA
    # pool's mean over the map becomes a sum times 1/HW), a last-bit change that reaches out.
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5 * out0.abs().max().item())
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-5 * dx0.abs().max().item())
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-5 * g0[k].abs().max().item(),
                                   msg=lambda msg, k=k: f"grad {k}: {msg}")


# ------------------------------------------------------- the grid limit (images per slice)


GRID_N = 65535 + 2  # one image past the grid limit; literal, so a changed cap can't hide it


def _grid_case(device):
    """GRID_N 2x3 maps (fp32), whose workspaces together fit the default budget: only the image
    cap slices them."""
    m = _module(8, 4, 2, (3,), SLICE_OPTS, "channels_first")
    x = torch.randn(GRID_N, 8, 2, 3, dtype=torch.float32)
    wt = {k: v.detach().float() for k, v in m.named_parameters()}
    gout = torch.randn_like(x)
    return m.options, x.to(device), {k: v.to(device) for k, v in wt.items()}, gout.to(device)


def test_cuda_host_batch_beyond_the_grid_limit(cuda_host):
    """The launchers cut the batch at MAX_IMAGES_PER_SLICE (the host build refuses a grid
    beyond CUDA's limits, as the device does) and the result is the reference's."""
    o, x, wt, gout = _grid_case("cpu")
    out, _, dx, grads = _cuda_run(cuda_host, o, x, wt, gout)
    _reference_checker(x, wt, o, gout)(out, dx, grads)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_batch_beyond_the_grid_limit(backend, no_tf32):
    """Both backends on the device, GRID_N images (grid axis 1 would need 65537 blocks): a
    launch error, or a wrong image past the limit, shows here."""
    from mslora_kernels.ops import mslora_unavailable_reason

    reason = mslora_unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    o, x, wt, gout = _grid_case("cuda")
    run = _triton_run if backend == "triton" else _cuda_device_run
    out, _, dx, grads = run(o, x, wt, gout)
    _reference_checker(x.cpu(), {k: v.cpu() for k, v in wt.items()}, o, gout.cpu())(
        out.cpu(), dx.cpu(), {k: v.cpu() for k, v in grads.items()})
