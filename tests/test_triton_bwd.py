"""The Triton backward launcher, called directly, against the reference's autograd.

``mslora_bwd(grad_out, x, weights, o, zmean)`` must return the gradient of ``out = x + H(x)``
for x and every weight (SPEC section 1 and 4). The expected values come from
``torch.autograd`` through :func:`mslora_kernels.reference.mslora` in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mslora_kernels import reference
from mslora_kernels.config import MSLoRAOptions
from mslora_kernels.testing import check_close

OPTION_NAMES = ("prenorm", "enhance", "pool", "gate", "shuffle")
ALL_ON = dict.fromkeys(OPTION_NAMES, True)
# layout name -> (data_format, memory format of the NCHW tensor)
LAYOUTS = {
    "nchw": ("channels_first", torch.contiguous_format),
    "nchw_cl": ("channels_first", torch.channels_last),
    "nhwc": ("channels_last", torch.contiguous_format),
}


def make_weights(o: MSLoRAOptions, device="cpu") -> dict[str, torch.Tensor]:
    """Random float64 weights of SPEC's shapes at Conv2d-like scales; ``up`` is non-zero."""
    c, d, g, nk = o.channels, o.rank, o.groups, len(o.kernel_sizes)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)
    w = {"proj.weight": r(d, c // g, 1, 1) / (c // g) ** 0.5,
         "down.weight": r(d, c // g, 1, 1) / (c // g) ** 0.5,
         "pw.weight": r(d, d, 1, 1) / d ** 0.5,
         "up.weight": r(c, d // g, 1, 1) / (d // g) ** 0.5}
    for i, k in enumerate(o.kernel_sizes):
        w[f"dw.{i}.weight"] = r(d, 1, k, k) / k
    if o.prenorm:
        w["norm.weight"], w["norm.bias"] = 1 + 0.1 * r(c), 0.1 * r(c)
    if o.enhance:
        w["enorm.weight"], w["enorm.bias"] = 1 + 0.1 * r(d), 0.1 * r(d)
    if o.gate:
        w["gate.weight"], w["gate.bias"] = r(nk, d, 1, 1) / d ** 0.5, 0.5 * r(nk)
    return w


def make_input(o: MSLoRAOptions, n, h, w, memory_format, device="cpu", dtype=torch.float64):
    if o.data_format == "channels_last":
        return torch.randn(n, h, w, o.channels, dtype=dtype, device=device)
    x = torch.randn(n, o.channels, h, w, dtype=dtype, device=device)
    return x.contiguous(memory_format=memory_format)


def reference_grads(x, weights, o, grad_out):
    """(grad_x, {name: grad}) of the reference's autograd, in the dtype of the inputs."""
    xr = x.detach().clone().requires_grad_()
    wr = {k: v.detach().clone().requires_grad_() for k, v in weights.items()}
    reference.mslora(xr, wr, o).backward(grad_out)
    return xr.grad, {k: v.grad for k, v in wr.items()}


def zmean_of(x, weights, o) -> torch.Tensor | None:
    """What the forward saves for pool: mean over H, W of z = down(u), float32 (N, D)."""
    if not o.pool:
        return None
    xc = x if o.data_format == "channels_first" else x.permute(0, 3, 1, 2)
    u = xc
    if o.prenorm:
        u = reference._layer_norm_channels(xc, weights["norm.weight"], weights["norm.bias"])
    z = F.conv2d(u, weights["down.weight"], groups=o.groups)
    return z.mean(dim=(2, 3)).float()


def run_bwd(x, weights, o, grad_out, dtype, deterministic=False, zmean=None):
    from mslora_kernels.triton.mslora_bwd import mslora_bwd

    if zmean is None:
        zmean = zmean_of(x.double(), {k: v.double() for k, v in weights.items()}, o)
    wd = {k: v.to(dtype) for k, v in weights.items()}
    return mslora_bwd(grad_out.to(dtype), x.to(dtype), wd, o, zmean, deterministic)


def check_all(gx, grads, ref_gx, ref_grads, dtype, base_gx=None, base_grads=None):
    check_close("grad_x", gx, ref_gx, dtype, baseline=base_gx)
    assert set(grads) == set(ref_grads), f"gradient keys {sorted(grads)} vs {sorted(ref_grads)}"
    for k in ref_grads:
        assert grads[k].shape == ref_grads[k].shape, k
        check_close(k, grads[k], ref_grads[k], dtype,
                    baseline=None if base_grads is None else base_grads[k])


def case(n, c, h, w, d, g, ks, layout, **opts):
    data_format, memory_format = LAYOUTS[layout]
    o = MSLoRAOptions(c, d, g, ks, data_format=data_format, **opts)
    x = make_input(o, n, h, w, memory_format)
    weights = make_weights(o)
    grad_out = torch.randn_like(x)
    return o, x, weights, grad_out


# ------------------------------------------------------------------------------------------
# CPU: the interpreter, float32, odd shapes (N=2, C=40, H=13, W=9, D=24, G=4)
# ------------------------------------------------------------------------------------------

ODD = dict(n=2, c=40, h=13, w=9, d=24, g=4)

# Every option alone (each in a different layout), every option on in every layout, and the
# plain module in every layout.
INTERP_CASES = (
    [pytest.param({}, lay, id=f"plain-{lay}") for lay in LAYOUTS]
    + [pytest.param({name: True}, lay, id=f"{name}-{lay}")
       for name, lay in zip(OPTION_NAMES, ("nhwc", "nchw_cl", "nchw", "nhwc", "nchw_cl"),
                            strict=True)]
    + [pytest.param(ALL_ON, lay, id=f"all-{lay}") for lay in LAYOUTS]
)


@pytest.mark.interpreter
@pytest.mark.parametrize("opts,layout", INTERP_CASES)
def test_bwd_matches_reference_fp32(opts, layout):
    o, x, weights, grad_out = case(**ODD, ks=(3, 5, 7), layout=layout, **opts)
    ref_gx, ref_grads = reference_grads(x, weights, o, grad_out)
    gx, grads = run_bwd(x, weights, o, grad_out, torch.float32)
    assert gx.shape == x.shape and gx.dtype == torch.float32
    assert gx.stride() == x.float().stride(), "grad_x must come back in x's memory format"
    check_all(gx, grads, ref_gx, ref_grads, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("ks,opts", [
    pytest.param((3,), {}, id="k3"),
    pytest.param((1, 3), {"gate": True, "pool": True}, id="k1_3-gate-pool"),
    pytest.param((5, 1), {"enhance": True}, id="k5_1-enhance"),
    # B1 recomputes c of the smallest kernel (here the middle one) and reads back the others'
    pytest.param((7, 3, 5), {"gate": True}, id="k7_3_5-gate"),
])
def test_bwd_kernel_sizes_fp32(ks, opts):
    o, x, weights, grad_out = case(**ODD, ks=ks, layout="nchw", **opts)
    ref_gx, ref_grads = reference_grads(x, weights, o, grad_out)
    gx, grads = run_bwd(x, weights, o, grad_out, torch.float32)
    check_all(gx, grads, ref_gx, ref_grads, torch.float32)


@pytest.mark.interpreter
def test_bwd_tiny_and_wide_shapes_fp32():
    """H = W = 1 (every tap but the centre falls outside), D > C, D = G, one image."""
    o, x, weights, grad_out = case(n=1, c=8, h=1, w=1, d=16, g=8, ks=(3, 5), layout="nhwc",
                                   pool=True, enhance=True, shuffle=True)
    ref_gx, ref_grads = reference_grads(x, weights, o, grad_out)
    gx, grads = run_bwd(x, weights, o, grad_out, torch.float32)
    check_all(gx, grads, ref_gx, ref_grads, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,deterministic", [
    pytest.param(torch.float32, False, id="fp32-atomic"),
    pytest.param(torch.float32, True, id="fp32-det"),
    pytest.param(torch.float16, False, id="fp16-atomic"),
    pytest.param(torch.bfloat16, False, id="bf16-atomic"),
    pytest.param(torch.bfloat16, True, id="bf16-det"),
])
def test_bwd_16_pixel_tiles(dtype, deterministic):
    """D = 72 -> BLOCK_D = 128, where the tiles hold 16 pixels (``_blocks``; 64 at D = 24):
    every option on, 117 pixels per image (not a multiple of 16). fp16 and bf16 by SPEC's 2x
    rule."""
    from mslora_kernels.triton.mslora_bwd import _blocks

    assert _blocks(72, dtype, False)[0] == 16
    o, x, weights, grad_out = case(n=2, c=40, h=13, w=9, d=72, g=4, ks=(3, 5), layout="nhwc",
                                   **ALL_ON)
    ref_gx, ref_grads = reference_grads(x, weights, o, grad_out)
    base = ()
    if dtype != torch.float32:
        base = reference_grads(x.to(dtype), {k: v.to(dtype) for k, v in weights.items()}, o,
                               grad_out.to(dtype))
    gx, grads = run_bwd(x, weights, o, grad_out, dtype, deterministic=deterministic)
    check_all(gx, grads, ref_gx, ref_grads, dtype, *base)


@pytest.mark.interpreter
def test_bwd_mixed_and_strided_layouts_fp32():
    """grad_out in another memory format than x (as autograd may hand it), and a strided view
    of x that the launcher must make contiguous; grad_x follows x's memory format."""
    o, x, weights, grad_out = case(**ODD, ks=(3,), layout="nchw_cl", prenorm=True, gate=True)
    ref_gx, ref_grads = reference_grads(x, weights, o, grad_out)
    gx, grads = run_bwd(x, weights, o, grad_out.contiguous(), torch.float32)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    check_all(gx, grads, ref_gx, ref_grads, torch.float32)

    wide = torch.randn(2, 40, 13, 18, dtype=torch.float64)
    xs = wide[..., ::2]  # strides (9360, 234, 18, 2): none of the three layouts
    ref_gx, ref_grads = reference_grads(xs, weights, o, grad_out)
    gx, grads = run_bwd(xs, weights, o, grad_out, torch.float32)
    check_all(gx, grads, ref_gx, ref_grads, torch.float32)


@pytest.mark.interpreter
def test_bwd_deterministic_is_bitwise_reproducible():
    o, x, weights, grad_out = case(**ODD, ks=(3, 5), layout="nchw_cl", **ALL_ON)
    gx1, g1 = run_bwd(x, weights, o, grad_out, torch.float32, deterministic=True)
    gx2, g2 = run_bwd(x, weights, o, grad_out, torch.float32, deterministic=True)
    assert torch.equal(gx1, gx2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"{k} differs between two deterministic runs"
    ref_gx, ref_grads = reference_grads(x, weights, o, grad_out)
    check_all(gx1, g1, ref_gx, ref_grads, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("ks", [(3, 5), (7, 3, 5)], ids=["k3_5", "k7_3_5"])
def test_bwd_lowp_within_twice_reference_error(ks, dtype):
    """fp16 and bf16: SPEC's 2x rule against the reference's own error in that dtype, both
    measured against float64. B1 keeps c_i in the compute dtype for every kernel but the
    smallest (the first, then the middle one)."""
    o, x, weights, grad_out = case(**ODD, ks=ks, layout="nhwc", **ALL_ON)
    ref_gx, ref_grads = reference_grads(x, weights, o, grad_out)
    h = dtype
    base_gx, base_grads = reference_grads(x.to(h), {k: v.to(h) for k, v in weights.items()}, o,
                                          grad_out.to(h))
    gx, grads = run_bwd(x, weights, o, grad_out, h)
    assert gx.dtype == h and all(g.dtype == h for g in grads.values())
    check_all(gx, grads, ref_gx, ref_grads, h, base_gx, base_grads)


@pytest.mark.interpreter
def test_bwd_zmean_none_recomputes_pool_mean():
    o, x, weights, grad_out = case(**ODD, ks=(3,), layout="nchw", pool=True)
    from mslora_kernels.triton.mslora_bwd import mslora_bwd

    wd = {k: v.float() for k, v in weights.items()}
    gx, grads = mslora_bwd(grad_out.float(), x.float(), wd, o, None)
    ref_gx, ref_grads = reference_grads(x, weights, o, grad_out)
    check_all(gx, grads, ref_gx, ref_grads, torch.float32)


# ------------------------------------------------------------------------------------------
# bad input: refused in Python, before any launch
# ------------------------------------------------------------------------------------------


def _bad_setup():
    o = MSLoRAOptions(8, 8, 2, (3,))
    x = torch.randn(1, 8, 4, 4)
    w = {k: v.float() for k, v in make_weights(o).items()}
    return o, x, w


def test_bwd_rejects_bad_input():
    from mslora_kernels.triton.mslora_bwd import mslora_bwd

    o, x, w = _bad_setup()
    with pytest.raises(TypeError, match="dtype"):
        mslora_bwd(x.double(), x.double(), w, o, None)
    with pytest.raises(ValueError, match="4-D"):
        mslora_bwd(x[0], x[0], w, o, None)
    with pytest.raises(ValueError, match="channels"):
        mslora_bwd(x[:, :4], x[:, :4], w, o, None)
    with pytest.raises(ValueError, match="grad_out"):
        mslora_bwd(x[:, :, :2], x, w, o, None)
    with pytest.raises(ValueError, match="missing"):
        mslora_bwd(x, x, {k: v for k, v in w.items() if k != "pw.weight"}, o, None)
    with pytest.raises(ValueError, match="shape"):
        mslora_bwd(x, x, dict(w, **{"pw.weight": torch.randn(8, 8)}), o, None)
    with pytest.raises(ValueError, match="compute dtype"):
        mslora_bwd(x, x, dict(w, **{"pw.weight": w["pw.weight"].half()}), o, None)
    op = MSLoRAOptions(8, 8, 2, (3,), pool=True)
    with pytest.raises(ValueError, match="zmean"):
        mslora_bwd(x, x, w, op, torch.zeros(2, 8))


# ------------------------------------------------------------------------------------------
# GPU: every dtype at odd and real sizes, SPEC section 4's rule against a float64 reference
# ------------------------------------------------------------------------------------------

GPU_SHAPES = {
    "odd": dict(n=2, c=40, h=13, w=9, d=24, g=4),
    "resnet_s2": dict(n=4, c=128, h=28, w=28, d=128, g=4),
    "swin_s3": dict(n=2, c=512, h=14, w=14, d=128, g=4),
}


def _gpu_cases():
    """Every dtype x layout x {plain, all options} at the odd shape and at ResNet's stage 2;
    bf16 also at Swin-B's stage 3 (C = 512)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        shapes = ("odd", "resnet_s2") + (("swin_s3",) if dtype == torch.bfloat16 else ())
        for shape in shapes:
            for layout in LAYOUTS:
                for tag, opts in (("plain", {}), ("all", ALL_ON)):
                    name = f"{str(dtype).split('.')[-1]}-{shape}-{layout}-{tag}"
                    yield pytest.param(dtype, shape, layout, opts, id=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape,layout,opts", list(_gpu_cases()))
def test_bwd_gpu(dtype, shape, layout, opts, no_tf32):
    deterministic = layout == "nchw_cl"  # the deterministic mode in a third of the cases
    data_format, memory_format = LAYOUTS[layout]
    s = GPU_SHAPES[shape]
    o = MSLoRAOptions(s["c"], s["d"], s["g"], (3, 5, 7), data_format=data_format, **opts)
    dev = "cuda"
    x = make_input(o, s["n"], s["h"], s["w"], memory_format, device=dev)
    weights = make_weights(o, device=dev)
    grad_out = torch.randn_like(x)
    ref_gx, ref_grads = reference_grads(x, weights, o, grad_out)
    base_gx = base_grads = None
    if dtype != torch.float32:
        base_gx, base_grads = reference_grads(
            x.to(dtype), {k: v.to(dtype) for k, v in weights.items()}, o, grad_out.to(dtype))
    gx, grads = run_bwd(x, weights, o, grad_out, dtype, deterministic=deterministic)
    assert gx.dtype == dtype and gx.stride() == x.to(dtype).stride()
    for k, g in grads.items():
        assert g.dtype == dtype, k
    check_all(gx, grads, ref_gx, ref_grads, dtype, base_gx, base_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bwd_gpu_deterministic_bitwise(dtype):
    o = MSLoRAOptions(128, 128, 4, (3, 5, 7), **ALL_ON)
    x = make_input(o, 8, 28, 28, torch.channels_last, device="cuda", dtype=dtype)
    weights = {k: v.to(dtype) for k, v in make_weights(o, device="cuda").items()}
    grad_out = torch.randn_like(x)
    first = run_bwd(x, weights, o, grad_out, dtype, deterministic=True)
    for _ in range(3):
        again = run_bwd(x, weights, o, grad_out, dtype, deterministic=True)
        assert torch.equal(first[0], again[0])
        for k in first[1]:
            assert torch.equal(first[1][k], again[1][k]), k
