"""The CUDA MSLoRA kernels' bodies (csrc/mslora.cuh), built for the CPU with the host compiler
and run through the real launcher orchestration (mslora_kernels.cuda.mslora.forward_impl /
backward_impl), against the reference and its autograd: every option, both physical layouts,
odd shapes, in fp32, fp16 and bf16 (the 2-byte storage types emulated bit for bit by
tests/host/lowp_host.h, whose conversions are held against torch's own casts here). This checks
the algorithm, the tiling, halos, shuffle, the low-precision loads/stores and every gradient
without a GPU; the GPU tests (test_cuda_mslora.py) check the device build."""

from __future__ import annotations

import importlib.util
import math
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from launches import AtenLaunches

from mslora_kernels import MSLoRA
from mslora_kernels.config import split_flat_grads
from mslora_kernels.cuda._ext import DTYPE_CODE
from mslora_kernels.cuda.mslora import MAX_PATHS, backward_impl, forward_impl
from mslora_kernels.reference import mslora as reference
from mslora_kernels.testing import check_close

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


# A prebuilt host module to test instead of building one: the sanitizer run
# (test_host_kernels_under_address_sanitizer) points its pytest here.
HOST_MODULE_ENV = "MSLORA_HOST_MODULE"
# AddressSanitizer and UndefinedBehaviorSanitizer, any report fatal.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer", "-g"]


def _build_host(dest: Path, sanitize: bool = False) -> Path:
    """Compiles tests/host/mslora_host.cpp into ``dest`` (a folder); the module's path."""
    if CXX is None:
        pytest.skip("no host C++ compiler")
    try:
        import pybind11
    except ImportError:  # a test requirement: a skip here would hide every host test in CI
        pytest.fail("pybind11 is missing: it is in the 'test' extra (pip install -e '.[test]'); "
                    "without it none of the CUDA kernels' host tests can run", pytrace=False)
    out = dest / ("mslora_host" + sysconfig.get_config_var("EXT_SUFFIX"))
    # -O2 without -ffast-math: the host float math must be IEEE, as the device's is (-O1 for the
    # sanitizers: their builds are several times slower to compile at -O2).
    opt = ["-O1", *SANITIZE_FLAGS] if sanitize else ["-O2"]
    cmd = [CXX, *opt, "-shared", "-fPIC", "-std=c++17", f"-I{ROOT / 'csrc'}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           str(ROOT / "tests" / "host" / "mslora_host.cpp"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def _load_host(path: Path):
    spec = importlib.util.spec_from_file_location("mslora_host", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    prebuilt = os.environ.get(HOST_MODULE_ENV)
    if prebuilt:
        return _load_host(Path(prebuilt))
    return _load_host(_build_host(tmp_path_factory.mktemp("host")))


def _launcher(host, smem_limit):
    def launch(kernel, dtype, nhwc, ints, ptrs):
        host.mslora_launch(kernel, dtype, nhwc, ints, ptrs, 0)

    return launch, host.mslora_smem_bytes, smem_limit


def _module(c, d, g, ks, opts, fmt):
    m = MSLoRA(c, rank=d, groups=g, kernel_sizes=ks, data_format=fmt, **opts).double()
    with torch.no_grad():
        for p in m.parameters():  # random everywhere, up and norms included
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 1.0 / p[0].numel() ** 0.5))
            if p.dim() == 1 and p.shape[0] != len(ks):
                p.add_(1.0)
    return m


OPTION_SETS = [
    {},
    {"prenorm": True, "enhance": True, "pool": True, "gate": True, "shuffle": True},
    {"gate": True},
    {"enhance": True, "shuffle": True},
    {"prenorm": True, "pool": True},
]
LAYOUTS = ["nchw", "channels_last_memory", "nhwc"]
# (N, C, H, W, D, G, kernel sizes), shared-memory limit. Besides odd sizes and small tiles, the
# edges of the depthwise runs and halo loads: W not a multiple of the tile width; D % 4 == 0
# (16-byte halo loads) and not; D not a multiple of either channel chunk (32, 16); k = 1; k = 9
# (not specialised); H, W smaller than the halo.
SHAPES = [((2, 12, 11, 9, 8, 4, (3, 5)), 227 * 1024),  # odd, all tile kernels in one row
          ((1, 6, 5, 13, 6, 3, (3, 7, 1)), 44 * 1024),  # small smem: 1-2 row tiles, 3 paths
          ((1, 8, 6, 10, 36, 4, (5, 1)), 227 * 1024),
          ((2, 6, 3, 4, 6, 2, (9, 3)), 227 * 1024),
          ((1, 4, 2, 3, 20, 2, (7, 3)), 227 * 1024)]
SHAPE_IDS = ["odd", "small-smem", "d36-k1", "k9-tiny", "d20-k7-tiny"]
# Every dtype x option set x layout x shape: 225 cases, each well under a second, after the
# ~10 s host compile.
CASES = [(dt, o) for dt in (torch.float32, torch.float16, torch.bfloat16) for o in OPTION_SETS]


def _grads(x, w, o, gout):
    """Reference output and its gradients wrt x and every weight, in x's dtype."""
    x = x.detach().requires_grad_(True)
    w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
    out = reference(x, w, o)
    return out.detach(), torch.autograd.grad(out, [x, *w.values()], gout)


def _reference_checker(x, w, o, gout):
    """check(out, dx, grads, tag=""): out, grad x and every weight gradient (shape, x's dtype)
    against the float64 reference on the same values, with SPEC's low-precision baseline (the
    reference run in x's dtype: torch CPU has every op it uses in fp16 and bf16) for fp16 and
    bf16. The references are computed once, for checking several runs."""
    dtype = x.dtype
    ref, grads64 = _grads(x.double(), {k: v.double() for k, v in w.items()}, o, gout.double())
    lowp = dtype != torch.float32
    base, base_grads = _grads(x, w, o, gout) if lowp else (None, [None] * len(grads64))

    def check(out, dx, grads, tag=""):
        check_close(f"out{tag}", out, ref, dtype, baseline=base)
        check_close(f"grad x{tag}", dx, grads64[0], dtype, baseline=base_grads[0])
        assert set(grads) == set(w)
        for name, gref, gbase in zip(w, grads64[1:], base_grads[1:]):
            assert grads[name].shape == gref.shape and grads[name].dtype == dtype, name
            check_close(f"grad {name}{tag}", grads[name], gref, dtype, baseline=gbase)

    return check


def _case(shape, dtype, opts, layout):
    """(options, x, weights, grad_out) of one case: random everything, x in ``layout``. The
    kernels' inputs are in ``dtype``, and the float64 reference sees exactly the same values, so
    a comparison measures the computation, not the rounding of the inputs."""
    n, c, h, w, d, g, ks = shape
    m = _module(c, d, g, ks, opts, "channels_last" if layout == "nhwc" else "channels_first")
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    if layout == "nhwc":
        x = x.permute(0, 2, 3, 1).contiguous()
    elif layout == "channels_last_memory":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    wt = {k: v.detach().to(dtype) for k, v in m.named_parameters()}
    gout = torch.randn_like(x)
    assert x.stride() == gout.stride()
    return m.options, x, wt, gout


def random_config(seed: int, max_paths: int):
    """(shape, dtype, options, layout) drawn from ``seed``, for the random-configuration tests
    (here and tests/test_triton_mslora.py): G in 1..4, C and D multiples of it (up to 96), 1 to
    ``max_paths`` kernel sizes from {1, 3, 5, 7, 9}, repeats allowed, each option on or off, N
    1..3, H 1..13, W 1..19, any dtype and layout. Redrawn past the degenerate configurations
    whose gradients are mathematically zero or nearly so, or ill-conditioned, where SPEC's
    relative error means nothing (measured: the float64 reference gives 1e-12 noise, fp32 eager
    errs by 1e8, or by 2e-4 to 1e-2 past SPEC's 1e-4): enhance at D = 1 (LayerNorm over one
    channel: s is constant) or D = 2 (over two, s is +-1 up to eps, and the backward divides by
    the two channels' difference: fp32 eager errs by 1e-2 on down.weight), enhance with gate on
    a single path (LayerNorm undoes the gate's per-pixel scale), prenorm at C = 1 or 2 (the same
    for LN_C: fp32 eager errs by 2e-4 on grad x at C = 2)."""
    rng = random.Random(seed)
    while True:
        g = rng.choice([1, 2, 3, 4])
        big = rng.random() < 0.3  # past the channel chunks (32) and several z chunks
        c, d = g * rng.randint(1, 24 if big else 6), g * rng.randint(1, 24 if big else 12)
        ks = tuple(rng.choice([1, 3, 5, 7, 9]) for _ in range(rng.randint(1, max_paths)))
        opts = {k: True for k in ("prenorm", "enhance", "pool", "gate", "shuffle")
                if rng.random() < 0.5 and not (k == "shuffle" and g == 1)}
        shape = (rng.randint(1, 3), c, rng.randint(1, 13), rng.randint(1, 19), d, g, ks)
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        layout = rng.choice(LAYOUTS)
        enhance, gate = "enhance" in opts, "gate" in opts
        degenerate = (enhance and (d <= 2 or (len(ks) == 1 and gate))) or \
            ("prenorm" in opts and c <= 2)
        if not degenerate:
            return shape, dtype, opts, layout


@pytest.mark.parametrize("seed", range(40))
def test_host_random_configurations(host, seed):
    """Forty configurations drawn at random (:func:`random_config`, up to 8 paths, and a random
    shared-memory limit, which moves the tiles; an H100's where the kernels need more than it
    gives, which they refuse by name): forward and every gradient against the reference. They
    add what the fixed grid above does not combine: option sets, kernel-size lists with repeats
    and 1x1 paths, several channel chunks, tiny and tall maps."""
    shape, dtype, opts, layout = random_config(seed, MAX_PATHS)
    torch.manual_seed(seed)
    o, x, wt, gout = _case(shape, dtype, opts, layout)
    check = _reference_checker(x, wt, o, gout)
    smem = random.Random(-seed).choice([44 * 1024, 100 * 1024])
    for limit in (smem, 227 * 1024):
        try:
            out, zmean = forward_impl(x, wt, o, *_launcher(host, limit))
            dx, grads = backward_impl(gout, x, wt, o, zmean, *_launcher(host, limit))
            break
        except ValueError as e:
            assert "bytes of shared memory" in str(e) and limit < 227 * 1024, e
    check(out, dx, grads)


@pytest.mark.parametrize("dtype,opts", CASES,
                         ids=[f"{str(dt)[6:]}-{'+'.join(o) or 'plain'}" for dt, o in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,smem", SHAPES, ids=SHAPE_IDS)
def test_host_kernels_match_reference(host, dtype, opts, layout, shape, smem):
    o, x, wt, gout = _case(shape, dtype, opts, layout)
    check = _reference_checker(x, wt, o, gout)

    launcher = _launcher(host, smem)
    out, zmean = forward_impl(x, wt, o, *launcher)
    assert out.dtype == dtype and out.stride() == x.stride()
    dx, grads = backward_impl(gout, x, wt, o, zmean, *launcher)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    check(out, dx, grads)


# The benchmark's default rank, groups and kernel sizes at two of its map sizes (ResNet-50's
# first stage, one image; a 14x14 stage at 256 channels), with an H100's shared memory: the
# tiles, channel chunks and tensor-core staging the GPU will run, which the small shapes above
# do not reach (D = 128 is four z chunks, 56-pixel rows several tiles wide). fp16 only at 14x14:
# its eager baseline is slow on the CPU.
BENCH_SHAPES = {"56x56": (1, 64, 56, 56, 128, 4, (3, 5, 7)),
                "14x14": (2, 256, 14, 14, 128, 4, (3, 5, 7))}
BENCH_CASES = [(sid, dt, lay) for sid in BENCH_SHAPES
               for dt, lay in [*((torch.bfloat16, lay) for lay in LAYOUTS),
                               (torch.float32, "nchw"), (torch.float32, "nhwc")]] + \
    [("14x14", torch.float16, "channels_last_memory")]


@pytest.mark.parametrize("shape_id,dtype,layout", BENCH_CASES,
                         ids=[f"{sid}-{str(dt)[6:]}-{lay}" for sid, dt, lay in BENCH_CASES])
@pytest.mark.parametrize("opts", OPTION_SETS[:2], ids=["plain", "all"])
def test_host_kernels_at_benchmark_shapes(host, opts, shape_id, dtype, layout):
    shape = BENCH_SHAPES[shape_id]
    test_host_kernels_match_reference(host, dtype, opts, layout, shape, 227 * 1024)


# ------------------------------------------------------ the emulated storage conversions


def _to_storage(host, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The host build's from_f32<T> (the kernels' store) applied to float32 ``v``."""
    v = v.contiguous()
    out = torch.empty(v.shape, dtype=dtype)
    host.to_storage(DTYPE_CODE[dtype], v.data_ptr(), out.data_ptr(), v.numel())
    return out


def _from_storage(host, v: torch.Tensor) -> torch.Tensor:
    """The host build's to_f32 (the kernels' load) applied to ``v`` (fp16 or bf16)."""
    v = v.contiguous()
    out = torch.empty(v.shape, dtype=torch.float32)
    host.from_storage(DTYPE_CODE[v.dtype], v.data_ptr(), out.data_ptr(), v.numel())
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


def _conversion_inputs(dtype: torch.dtype) -> torch.Tensor:
    """float32 values that exercise every rounding case of float32 -> ``dtype``."""
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(1234)
    # Every float32 bit pattern class: random bits (NaNs, infs, subnormals, huge values).
    raw = torch.randint(-2**31, 2**31, (200_000,), generator=gen, dtype=torch.int64)
    rand_bits = raw.to(torch.int32).view(torch.float32)
    # Moderate magnitudes over the whole range of ``dtype``, normals and subnormals.
    lo, hi = math.log2(info.smallest_normal) - 12, math.log2(info.max) + 1
    scale = torch.exp2(torch.empty(200_000, dtype=torch.float64).uniform_(lo, hi, generator=gen))
    spread = (torch.randn(200_000, generator=gen, dtype=torch.float64) * scale).float()
    # Exact ties halfway between neighbours of ``dtype`` (both parities of the lower one), and
    # one float32 ulp either side of each tie.
    every = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[torch.isfinite(every)].double()
    lower, upper = every.sort().values[:-1], every.sort().values[1:]
    ties = ((lower + upper) / 2).float()
    assert torch.equal(ties.double(), (lower + upper) / 2)  # exactly representable in float32
    ties = ties[ties.double() != 0]
    near = torch.cat([torch.nextafter(ties, torch.full_like(ties, math.inf)),
                      torch.nextafter(ties, torch.full_like(ties, -math.inf))])
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, info.max,
                            -info.max, info.tiny, info.smallest_normal / 2, 2.0**-149,
                            torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max,
                            65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001,
                            3.3895313892515355e38, 3.3961775292304e38], dtype=torch.float32)
    return torch.cat([rand_bits, spread, ties, near, special])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_host_storage_conversions_match_torch(host, dtype):
    """from_f32<T> rounds like torch's cast (round to nearest even, overflow to inf, NaN kept),
    bit for bit; to_f32 is exact on every one of the 65536 bit patterns."""
    v = _conversion_inputs(dtype)
    got, want = _to_storage(host, v, dtype), v.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN must stay NaN and nothing else become NaN"
    bad = (_bits(got) != _bits(want)) & ~nan
    assert not bad.any(), (
        f"{int(bad.sum())} of {v.numel()} float32 -> {dtype} conversions differ from torch's, "
        f"e.g. {v[bad][:5].tolist()} -> bits {_bits(got)[bad][:5].tolist()}, torch "
        f"{_bits(want)[bad][:5].tolist()}")
    # The cases above are all there: ties that round down and up, subnormal and overflow results.
    w = want[~nan].float()
    assert (w == 0).any() and torch.isinf(w).any() and (w.abs() < torch.finfo(dtype).tiny).any()

    every = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(dtype)
    back, want_back = _from_storage(host, every), every.float()
    nan = torch.isnan(want_back)
    assert torch.equal(torch.isnan(back), nan)
    assert torch.equal(back.view(torch.int32)[~nan], want_back.view(torch.int32)[~nan])


@pytest.mark.parametrize("tile_w", [5, 12])  # one partial run of 8; a full and a partial run
@pytest.mark.parametrize("ks", [(7, 3), (9, 1)], ids=["k7", "k9"])  # specialised, generic
@pytest.mark.parametrize("opts", OPTION_SETS[1:3], ids=lambda o: "+".join(o))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_host_kernels_other_tile_widths(host, dtype, opts, ks, tile_w, monkeypatch):
    import mslora_kernels.cuda.mslora as launcher

    monkeypatch.setattr(launcher, "TILE_W", tile_w)
    test_host_kernels_match_reference(host, dtype, opts, "nchw", (2, 8, 7, 29, 12, 4, ks),
                                      227 * 1024)


def test_host_backward_is_deterministic(host):
    m = _module(8, 8, 2, (3, 5), {"gate": True, "enhance": True, "pool": True}, "channels_first")
    x = torch.randn(2, 8, 9, 10)
    w = {k: v.detach().float() for k, v in m.named_parameters()}
    launcher = _launcher(host, 227 * 1024)
    out, zmean = forward_impl(x, w, m.options, *launcher)
    g = torch.randn_like(out)
    a = backward_impl(g, x, w, m.options, zmean, *launcher)
    b = backward_impl(g, x, w, m.options, zmean, *launcher)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in w)


@pytest.mark.parametrize("opts", [{"prenorm": True}, OPTION_SETS[1]], ids=["prenorm", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", [150, 34])
def test_host_layernorm_sums_at_wide_channels_and_offset_inputs(host, c, layout, opts):
    """The per-pixel sums over C (x's LN_C statistics in prep, fwd, bwd_tile and bwd_dx, and
    bwd_dx's LN backward means; csrc's channel_sums) split C over 16 threads a pixel: here C is
    wider than the SHAPES' and not a multiple of 16 (parts of 10 and 9, or 3 and 2, channels),
    and x sits at 100 + N(0, 1), where a one-pass E[x^2] - E[x]^2 loses the variance in fp32
    (tried: relative errors of 0.8-1.1e-3, over SPEC's 1e-4) and the two passes do not (errors
    under 1e-5). 70 pixels: partial pixel blocks and tiles."""
    o, x, wt, gout = _case((2, c, 5, 7, 8, 2, (3, 5)), torch.float32, opts, layout)
    with torch.no_grad():
        x.add_(100.0)
    check = _reference_checker(x, wt, o, gout)
    launcher = _launcher(host, 227 * 1024)
    out, zmean = forward_impl(x, wt, o, *launcher)
    dx, grads = backward_impl(gout, x, wt, o, zmean, *launcher)
    check(out, dx, grads)


# Shapes for the tensor-core products (N, C, H, W, D, G, kernel sizes): D=40 pads to 48 (three
# k steps and n tiles) and 13 x 9 leaves partial tiles; C/G = 75 streams the grouped C -> D
# products in three K chunks (the last partial) and the D -> C ones in three column chunks
# (32, 32, 11), bwd_dx's K = 2 D/G = 40 straddles da | dz across two chunks; D/G = 36 > 32 gives
# the up product two K chunks (restaging A per column chunk).
TC_SHAPES = [(2, 20, 13, 9, 40, 4, (3, 5)), (1, 150, 7, 9, 40, 2, (3,)),
             (1, 66, 5, 11, 72, 2, (3, 5))]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("shape", TC_SHAPES, ids=["d40", "c-chunks", "dg36"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_host_tensor_core_products_are_used_and_right(host, dtype, shape, layout, monkeypatch):
    """fp16/bf16 run the channel products (D x D and grouped) through csrc/tc.cuh's block_mma
    (its host loops here; WMMA on the GPU) over staged, zero-padded operands, in chunks (see
    TC_SHAPES). Right with and without MSLORA_CUDA_TENSOR_CORES=0, and the two paths really
    differ (operands rounded to dtype)."""
    from mslora_kernels.cuda.mslora import tensor_cores

    n, c, h, w, d, g, ks = shape
    m = _module(c, d, g, ks, OPTION_SETS[1], layout)
    o = m.options
    x = torch.randn(*((n, c, h, w) if layout == "channels_first" else (n, h, w, c))).to(dtype)
    wt = {k: v.detach().to(dtype) for k, v in m.named_parameters()}
    gout = torch.randn_like(x)
    check = _reference_checker(x, wt, o, gout)
    launcher = _launcher(host, 227 * 1024)
    ints = {"N": n, "C": c, "H": h, "W": w, "D": d, "G": g, "ks": list(ks), "TH": 8, "TW": 8,
            "CH": 32, "PB": 32, "enhance": 1}
    for kernel in ("prep", "fwd", "bwd_tile", "bwd_dx"):  # tensor-core operands are planned
        assert host.mslora_smem_bytes(kernel, {**ints, "tc": 1}) > \
            host.mslora_smem_bytes(kernel, {**ints, "tc": 0}), kernel
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MSLORA_CUDA_TENSOR_CORES", flag)
        assert tensor_cores(dtype) == (flag == "1")
        out, zmean = forward_impl(x, wt, o, *launcher)
        dx, grads = backward_impl(gout, x, wt, o, zmean, *launcher)
        check(out, dx, grads, f" tc={flag}")
        results[flag] = (out, dx)
    for a, b in zip(results["1"], results["0"]):
        assert not torch.equal(a, b)
    assert not tensor_cores(torch.float32)


def test_host_odd_strides_give_the_fake_impls_strides(host):
    """A channels_last tensor sliced along W: out and dx have the strides the ops' fake impls
    promise (normalize_layout's rule, shared with the Triton launchers), values right."""
    from mslora_kernels.triton._common import normalize_layout

    m = _module(8, 8, 2, (3, 5), {"gate": True}, "channels_first")
    x = torch.randn(2, 8, 9, 14).contiguous(memory_format=torch.channels_last)[:, :, :, ::2]
    want = torch.empty_like(normalize_layout(x, "channels_first")).stride()
    w64 = {k: v.detach() for k, v in m.named_parameters()}
    gout = torch.randn(x.shape)
    ref, grads64 = _grads(x.double(), w64, m.options, gout.double())
    w = {k: v.float() for k, v in w64.items()}
    launcher = _launcher(host, 227 * 1024)
    out, zmean = forward_impl(x, w, m.options, *launcher)
    dx, _ = backward_impl(gout, x, w, m.options, zmean, *launcher)
    assert out.stride() == want and dx.stride() == want
    check_close("out", out, ref, torch.float32)
    check_close("grad x", dx, grads64[0], torch.float32)


def test_tile_rows_prefer_two_blocks_per_sm():
    """The planner takes the largest tile whose block fits twice in an SM's shared memory, else
    the largest that fits once, else refuses with a message naming the kernel and the sizes."""
    from mslora_kernels.config import MSLoRAOptions
    from mslora_kernels.cuda.mslora import TILE_ROWS, _tile_rows

    o = MSLoRAOptions(channels=16, rank=8, groups=2)
    per_row = 10_000  # bytes per tile row of a made-up kernel

    def smem(kernel, ints):
        assert kernel == "fwd" and ints["CH"] == 32
        return 1_000 + per_row * ints["TH"]

    # 8 rows need 81 kB: fits once in 100 kB but not twice; 4 rows (41 kB) fit twice.
    assert _tile_rows("fwd", 32, {}, o, smem, 100_000) == 4
    assert _tile_rows("fwd", 32, {}, o, smem, 200_000) == TILE_ROWS[0] == 8
    assert _tile_rows("fwd", 32, {}, o, smem, 12_000) == 1  # fits once only
    with pytest.raises(ValueError, match="fwd kernel even with one-row tiles"):
        _tile_rows("fwd", 32, {}, o, smem, 10_000)


def _nan_workspaces(monkeypatch):
    """Every workspace the CUDA launcher allocates from now on NaN-filled (a partial row or
    pixel no kernel writes poisons the result), on the device of the tensor it is made like;
    returns the list they are appended to. Shared with the GPU tests."""
    import mslora_kernels.cuda.mslora as launcher

    made = []

    def nan_ws(rows, cols, like, dtype=None):
        made.append(torch.full((rows, cols), math.nan, dtype=dtype or like.dtype,
                               device=like.device))
        return made[-1]

    monkeypatch.setattr(launcher, "_ws", nan_ws)
    return made


def _run_recording(host, case, slots, monkeypatch):
    """backward_impl with every workspace NaN-filled (a partial row or pixel no kernel writes
    poisons the result) and the bwd_dz launch recorded: (dx, grads, {name: shape} of the
    partial buffers bwd_dz got, its ints)."""
    o, w, x, gout, _ = case
    made = _nan_workspaces(monkeypatch)
    launch, smem_bytes, limit = _launcher(host, 227 * 1024)
    seen = {}

    def recording(kernel, dtype, nhwc, ints, ptrs):
        if kernel == "bwd_dz":
            by_ptr = {t.data_ptr(): tuple(t.shape) for t in made}
            seen["shapes"] = {k: by_ptr[v] for k, v in ptrs.items() if k.startswith("part_")}
            seen["ints"] = dict(ints)
        launch(kernel, dtype, nhwc, ints, ptrs)

    out, zmean = forward_impl(x, w, o, launch, smem_bytes, limit)
    dx, grads = backward_impl(gout, x, w, o, zmean, recording, smem_bytes, limit, slots=slots)
    return dx, grads, seen["shapes"], seen["ints"]


def _dz_case(n):
    """(options, fp32 weights, x, grad_out, float64 reference gradients) with every bwd_dz
    partial (dK, gate) plus pool and enhance; x is (n, 8, 13, 9): 2 x 2 tiles of 8 x 8 per image."""
    m = _module(8, 8, 2, (3, 5), {"gate": True, "pool": True, "enhance": True}, "channels_first")
    w = {k: v.detach().float() for k, v in m.named_parameters()}
    x = torch.randn(n, 8, 13, 9)
    gout = torch.randn_like(x)
    _, grads64 = _grads(x.double(), {k: v.double() for k, v in w.items()}, m.options,
                        gout.double())
    return m.options, w, x, gout, grads64


def _check_grads(case, dx, grads):
    _, w, _, _, grads64 = case
    check_close("grad x", dx, grads64[0], torch.float32)
    for name, gref in zip(w, grads64[1:]):
        check_close(f"grad {name}", grads[name], gref, torch.float32)


@pytest.mark.parametrize("slots", [1, 3, 5, 100])
def test_host_bwd_dz_blocks_take_several_tiles(host, slots, monkeypatch):
    """bwd_dz with fewer blocks than tiles (8 here): one block for all, 3 and 5 blocks (which do
    not divide 8: blocks of 3 and 2 tiles, of 2 and 1), and more slots than tiles (capped: one
    tile a block). Every gradient right; each bwd_dz partial buffer has one row per block, and
    every row is written (NaN-filled buffers)."""
    case = _dz_case(2)
    dx, grads, shapes, ints = _run_recording(host, case, slots, monkeypatch)
    blocks = min(slots, 2 * 4)
    d, nk, ktot = 8, 2, 3 * 3 + 5 * 5
    assert ints["dz_blocks"] == blocks
    assert shapes["part_dw"] == (blocks, d * ktot)
    assert shapes["part_gate_w"] == (blocks, nk * d) and shapes["part_gate_b"] == (blocks, nk)
    _check_grads(case, dx, grads)


def test_host_bwd_dz_partial_rows_do_not_grow_with_batch(host, monkeypatch):
    """With the default bound (dz_slots: DZ_SLOTS_HOST on the CPU) the dK / gate partial buffers
    have that many rows whether the batch has 4 or 28 tiles (before: one row per tile);
    gradients right in both."""
    from mslora_kernels.cuda.mslora import DZ_SLOTS_HOST, dz_slots

    assert dz_slots(torch.device("cpu")) == DZ_SLOTS_HOST
    for n in (1, 7):
        case = _dz_case(n)
        dx, grads, shapes, ints = _run_recording(host, case, None, monkeypatch)
        assert n * 4 > DZ_SLOTS_HOST and ints["dz_blocks"] == DZ_SLOTS_HOST
        assert shapes["part_dw"][0] == shapes["part_gate_w"][0] == DZ_SLOTS_HOST
        assert shapes["part_pool"][0] == n * 4  # bwd_tile's partials stay per tile
        _check_grads(case, dx, grads)


def test_host_backward_refuses_zero_slots(host):
    o, w, x, gout, _ = _dz_case(1)
    launcher = _launcher(host, 227 * 1024)
    out, zmean = forward_impl(x, w, o, *launcher)
    with pytest.raises(ValueError, match="slots"):
        backward_impl(gout, x, w, o, zmean, *launcher, slots=0)


WORKSPACES = ("z", "s", "mp", "dt", "da", "ds0", "dz")


@pytest.mark.parametrize("layout", ["nchw", "channels_last_memory"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_host_workspaces_are_in_x_dtype(host, dtype, layout, monkeypatch):
    """Every D-channel workspace the launcher hands a kernel (forward and backward) is an
    (N*H*W, D) tensor of x's dtype (the kernels' T) but the backward's z and ds0, fp32
    (FP32_WORKSPACES; the forward's z is in x's dtype), and every partial-sum buffer fp32;
    prenorm's xstats (prep's LN_C statistics of x) is (N*H*W, 2) fp32, gate's gsig (prep's gate
    sigmoids) (N*H*W, nk) fp32, prenorm's u (LN_C(x), which bwd_dx writes for the proj / down
    GEMMs in NHWC memory) (N*H*W, C) in x's dtype; each kernel gets the workspaces it reads or
    writes; s, m' and dt are freed before dz is allocated, z and ds0 before bwd_dx; results
    right (NaN-filled buffers: a pixel prep or bwd_dx did not write poisons them)."""
    import mslora_kernels.cuda.mslora as launcher

    assert launcher.FP32_WORKSPACES == ("z", "ds0")

    n, c, h, w, d, g, ks = 2, 12, 7, 9, 8, 4, (3, 5)
    m = _module(c, d, g, ks, OPTION_SETS[1], "channels_first")
    o = m.options
    x = torch.randn(n, c, h, w).to(dtype)
    if layout == "channels_last_memory":
        x = x.contiguous(memory_format=torch.channels_last)
    wt = {k: v.detach().to(dtype) for k, v in m.named_parameters()}
    gout = torch.randn_like(x)
    made = _nan_workspaces(monkeypatch)
    launch, smem_bytes, limit = _launcher(host, 227 * 1024)
    seen = {}
    backward = False

    stats = ("xstats", "gsig", "u")

    def recording(kernel, code, nhwc, ints, ptrs):
        by_ptr = {t.data_ptr(): t for t in made}
        for k, v in ptrs.items():
            if k in WORKSPACES + stats or k.startswith("part_"):
                t = by_ptr[v]
                fp32 = k in ("ds0", "xstats", "gsig") or k.startswith("part_") or \
                    (k == "z" and backward)
                shape = {"xstats": (n * h * w, 2), "gsig": (n * h * w, len(ks)),
                         "u": (n * h * w, c)}.get(k, (n * h * w, d) if k in WORKSPACES else t.shape)
                assert (t.dtype, t.shape) == (torch.float32 if fp32 else dtype, shape), \
                    (kernel, k, t.dtype, t.shape)
        seen.setdefault(kernel, []).append({k for k in ptrs if k in WORKSPACES + stats})
        launch(kernel, code, nhwc, ints, ptrs)

    out, zmean = forward_impl(x, wt, o, recording, smem_bytes, limit)
    assert zmean.dtype == torch.float32
    assert seen == {"pack": [set()], "prep": [{"z", "xstats", "gsig"}],
                    "fwd": [{"z", "xstats", "gsig"}]}
    seen.clear()
    backward = True
    dx, grads = backward_impl(gout, x, wt, o, zmean, recording, smem_bytes, limit)
    assert seen == {"pack": [set()], "prep": [{"z", "xstats", "gsig"}],
                    "bwd_tile": [set(WORKSPACES) - {"dz"} | {"xstats", "gsig"}],
                    "bwd_pool": [set()], "bwd_dz": [{"z", "da", "ds0", "dz", "gsig"}],
                    "bwd_dx": [{"da", "dz", "xstats"} | ({"u"} if layout != "nchw" else set())],
                    "bwd_finish": [set()]}
    _reference_checker(x, wt, o, gout)(out, dx, grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("c,d,ks", [(12, 8, (3, 5)), (12, 8, (7, 1, 5, 3, 9, 3, 1, 5)),
                                    (64, 128, (3, 5, 7))],  # pw: 16 of pack's blocks
                         ids=["2paths", "8paths", "d128"])
def test_kernel_weights(host, dtype, c, d, ks, monkeypatch):
    """What the launcher hands the kernels as weights: the channel products' (proj, down, pw,
    up) in x's dtype, as the module holds them (csrc reads them through wl<T>), and their
    transposes; the depthwise taps packed path after path, the norms and the gate in fp32;
    every one contiguous, in the shape Params documents, at a WEIGHT_ALIGN-element offset. The
    transposes and fp32 copies come from one pack launch (the host build's) into NaN-filled
    buffers: an element it missed would show."""
    from mslora_kernels.cuda.mslora import WEIGHT_ALIGN, _kernel_weights

    _nan_workspaces(monkeypatch)
    g = 4
    m = _module(c, d, g, ks, OPTION_SETS[1], "channels_first")
    wt = {k: v.detach().to(dtype) for k, v in m.named_parameters()}
    launched = []

    def launch(kernel, *args):
        launched.append(kernel)
        _launcher(host, 227 * 1024)[0](kernel, *args)

    kw = _kernel_weights(wt, m.options, launch)
    assert launched == ["pack"]
    shapes = {"proj": (d, c // g), "down": (d, c // g), "pw": (d, d), "up": (c, d // g)}
    for k, shape in shapes.items():
        src = wt[f"{k}.weight"]
        assert (kw[k].dtype, kw[k].shape) == (dtype, shape), k
        assert torch.equal(kw[k], src.reshape(shape)), k
        assert kw[f"{k}_t"].dtype == dtype and torch.equal(kw[f"{k}_t"], kw[k].t()), k
    assert torch.equal(kw["dw"], torch.cat([wt[f"dw.{i}.weight"].reshape(-1).float()
                                            for i in range(len(ks))]))
    assert kw["gate_w"].shape == (len(ks), d)
    for k, name in (("norm_w", "norm.weight"), ("norm_b", "norm.bias"),
                    ("enorm_w", "enorm.weight"), ("enorm_b", "enorm.bias"),
                    ("gate_w", "gate.weight"), ("gate_b", "gate.bias")):
        assert torch.equal(kw[k].reshape(-1), wt[name].float().reshape(-1)), k
    for k, v in kw.items():
        assert v.is_contiguous(), k
        assert v.dtype == (dtype if k.split("_t")[0] in shapes else torch.float32), k
        if k not in shapes:  # the pack kernel's outputs: sections of two buffers
            assert v.storage_offset() % WEIGHT_ALIGN == 0, k


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_workspace_bytes_per_pixel(fmt, prenorm, gate):
    """The helper's phases: the six workspaces of bwd_tile at the peak for small C (bf16: z and
    ds0 4 D B each, the other four 2 D B), the C-channel copies and LN's output (in NHWC memory
    bwd_dx's LN_C(x) alone) where C is large, plus the partial sums and, under prenorm, xstats
    (8 B); under gate, gsig (4 nk B) until bwd_dz; fp32: every workspace 4 D B."""
    from mslora_kernels.config import MSLoRAOptions
    from mslora_kernels.cuda.mslora import workspace_bytes_fixed, workspace_bytes_per_pixel

    small = MSLoRAOptions(64, 128, 4, (3, 5, 7), data_format=fmt)
    assert workspace_bytes_per_pixel(small, torch.bfloat16) == 2 * 128 * 4 + 4 * 128 * 2
    assert workspace_bytes_per_pixel(small, torch.float16) == 2 * 128 * 4 + 4 * 128 * 2
    assert workspace_bytes_per_pixel(small, torch.float32) == 6 * 128 * 4
    o = MSLoRAOptions(1024, 128, 4, (3, 5, 7), data_format=fmt, prenorm=prenorm, pool=True,
                      gate=gate)
    copy = fmt == "channels_first"
    got = workspace_bytes_per_pixel(o, torch.bfloat16, tile_pixels=64, pixel_block=32)
    want = max(2 * 128 * 4 + 4 * 128 * 2 + gate * 4 * 3,
               2 * 128 * 4 + 2 * 128 * 2 + copy * 1024 * 2 + gate * 4 * 3,
               2 * 128 * 2 + (copy or prenorm) * 1024 * 2 +
               (copy and prenorm) * (1024 * 2 + 8))
    assert got == want + 128 * 4 / 64 + prenorm * 2 * 1024 * 4 / 32 + prenorm * 8
    assert workspace_bytes_per_pixel(o, torch.bfloat16, nchw_memory=False, tile_pixels=64,
                                     pixel_block=32) <= got
    assert workspace_bytes_fixed(o, 10) > workspace_bytes_fixed(o, 1) > 0


# ------------------------------------- the threads executor: races and thread-private state
#
# The serial executor runs each stage for tid = 0 .. nt-1 with ONE copy of the body's locals, so
# two defects that break the GPU build pass there: a thread reading, within one stage, an
# element another thread of that stage writes (a race: its result depends on the threads'
# order), and a body-scope local that one thread writes and others read (on the GPU each thread
# has its own). The host build's threads executor (set_schedule(seed >= 0)) runs each GPU thread
# as a fiber with its own stack through the whole body, barriers between stages, in the order
# the seed sets (tests/host/mslora_host.cpp); compute-sanitizer's racecheck on the GPU covers
# the device build itself.

SCHEDULES = {"ascending": 0, "descending": 1, "shuffled": 2}


@pytest.fixture
def schedule(host):
    """set(seed): the executor of the host build's launches; serial again after the test."""
    yield host.set_schedule
    host.set_schedule(-1)


def _toy(host, which, seed):
    host.set_schedule(seed)
    return torch.tensor(host.toy(which))


def _same(a, b):
    """Bitwise equality, NaN included."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


def test_host_threads_executor_catches_what_serial_hides(host, schedule):
    """Three deliberately wrong toy blocks (and their right twins): the serial executor passes
    each wrong one; the threads executor shows each."""
    want = torch.arange(256, dtype=torch.float32) + 42
    # A local written by thread 0 and read by all: right only when every thread shares it.
    assert _same(_toy(host, "shared_local", -1), want)
    assert not _same(_toy(host, "shared_local", 0), want)
    for seed in SCHEDULES.values():
        assert _same(_toy(host, "shared_local_ok", seed), want)
    # A neighbour's slot read in the stage that writes it: the result follows the order.
    serial = _toy(host, "race", -1)
    assert not _same(_toy(host, "race", 1), serial) and not _same(_toy(host, "race", 2), serial)
    ok = _toy(host, "race_ok", -1)
    assert _same(ok, torch.roll(torch.arange(256, dtype=torch.float32), -1))
    for seed in SCHEDULES.values():
        assert _same(_toy(host, "race_ok", seed), ok)
    # A barrier that thread 0 skips: no GPU would finish the block either.
    _toy(host, "divergent", -1)
    with pytest.raises(RuntimeError, match="divergent barrier"):
        _toy(host, "divergent", 0)


def _run_kernels(host, o, x, wt, gout, smem, slots=None):
    launcher = _launcher(host, smem)
    out, zmean = forward_impl(x, wt, o, *launcher)
    dx, grads = backward_impl(gout, x, wt, o, zmean, *launcher, slots=slots)
    return out, dx, grads


def _check_every_schedule(host, schedule, o, x, wt, gout, smem, slots=None):
    """The kernels' output and every gradient: right under the serial executor, and bitwise the
    same under the threads executor on every schedule."""
    schedule(-1)
    out, dx, grads = _run_kernels(host, o, x, wt, gout, smem, slots)
    _reference_checker(x, wt, o, gout)(out, dx, grads)
    for name, seed in SCHEDULES.items():
        schedule(seed)
        out_t, dx_t, grads_t = _run_kernels(host, o, x, wt, gout, smem, slots)
        assert _same(out_t, out), f"out differs with {name} threads"
        assert _same(dx_t, dx), f"grad x differs with {name} threads"
        for k in grads:
            assert _same(grads_t[k], grads[k]), f"grad {k} differs with {name} threads"


@pytest.mark.parametrize("opts", [OPTION_SETS[0], OPTION_SETS[1]], ids=["plain", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,smem", SHAPES, ids=SHAPE_IDS)
def test_host_kernels_are_race_free_and_thread_private(host, schedule, shape, smem, dtype,
                                                       layout, opts):
    """Every kernel, every shape of SHAPES (several tile sizes, halos, channel chunks), fp16 and
    bf16 on tensor cores: no result depends on the order of the threads or shares a local."""
    _check_every_schedule(host, schedule, *_case(shape, dtype, opts, layout), smem)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", TC_SHAPES, ids=["d40", "c-chunks", "dg36"])
def test_host_tensor_core_staging_is_race_free(host, schedule, shape, layout):
    """The tensor-core products' staging and chunking (TC_SHAPES) under every schedule."""
    _check_every_schedule(host, schedule, *_case(shape, torch.bfloat16, OPTION_SETS[1], layout),
                          227 * 1024)


@pytest.mark.parametrize("slots", [1, 3])
def test_host_bwd_dz_block_runs_are_race_free(host, schedule, slots):
    """bwd_dz's persistent blocks, each a run of tiles into one partial row, under every
    schedule (blocks in reverse order too)."""
    o, w, x, gout, _ = _dz_case(2)
    _check_every_schedule(host, schedule, o, x, w, gout, 227 * 1024, slots)


# ------------------------------------------------ device preconditions and the sanitizers


@pytest.mark.parametrize("which, offset, broken", [
    ("mma", 0, ""), ("mma", 32, ""), ("mma", 16, "not 32-byte aligned"),
    ("vec", 0, ""), ("vec", 16, ""), ("vec", 8, "not a multiple of its size"),
])
def test_host_build_checks_the_device_alignment_rules(host, which, offset, broken):
    """The host build checks what the GPU enforces only by faulting: WMMA operands 32-byte
    aligned, a 16-byte vector load at a multiple of 16. (Every launch of the other tests runs
    these checks, and fails on the first one broken.)"""
    got = host.check_preconditions(which, offset)
    assert (got == "") if not broken else (broken in got), got


def _compiler_lib(name: str) -> str | None:
    """The path of the C++ compiler's runtime library ``name``, or None."""
    if CXX is None:
        return None
    r = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True)
    path = r.stdout.strip()
    return path if r.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="session")
def sanitized_host(tmp_path_factory):
    """The environment of a process that loads the module built with ASan + UBSan (its path in
    HOST_MODULE_ENV)."""
    if os.environ.get(HOST_MODULE_ENV):
        pytest.skip("already in the sanitizer run")
    libasan = _compiler_lib("libasan.so")
    if libasan is None:
        pytest.skip(f"{CXX or 'no C++ compiler'} has no AddressSanitizer runtime (libasan.so)")
    path = _build_host(tmp_path_factory.mktemp("host-asan"), sanitize=True)
    # Python itself is not instrumented: the runtime must come first; leaks are Python's. The
    # C++ runtime comes right after it: ASan resolves its __cxa_throw interceptor once, at start,
    # and with libstdc++ loaded only later (by an import) the first C++ exception thrown aborts
    # the process in ASan's own CHECK (triton 3.8's libtriton throws and catches one on import).
    # The host kernels need no GPU, and CUDA's driver and ASan's shadow memory do not mix: on a
    # GPU machine the process sees none (and the shadow gap is left unprotected, as CUDA needs).
    preload = [libasan, *filter(None, [_compiler_lib("libstdc++.so.6")])]
    env = dict(os.environ, LD_PRELOAD=" ".join(preload), CUDA_VISIBLE_DEVICES="",
               ASAN_OPTIONS="detect_leaks=0:protect_shadow_gap=0",
               UBSAN_OPTIONS="print_stacktrace=1", **{HOST_MODULE_ENV: str(path)})
    return env


def _run_sanitized(env, code: str) -> subprocess.CompletedProcess:
    """``code`` in a sanitized process, with the sanitized module loaded as ``h``."""
    load = (f"import importlib.util as u, torch; s = u.spec_from_file_location('mslora_host', "
            f"{env[HOST_MODULE_ENV]!r}); h = u.module_from_spec(s); s.loader.exec_module(h); ")
    return subprocess.run([sys.executable, "-c", load + code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _expect_report(env, code: str, report: str) -> None:
    r = _run_sanitized(env, code)
    assert r.returncode != 0, f"no sanitizer report for {code!r}"
    assert report in r.stderr, r.stderr[-3000:]


def test_sanitizers_see_what_the_kernels_could_do_wrong(sanitized_host):
    """The sanitized build's run would show a kernel reading past a tensor, writing past its
    block's shared memory or overflowing a signed index (else the clean run below would prove
    nothing)."""
    env = sanitized_host
    _expect_report(env, "v = torch.randn(100).half(); out = torch.empty(101); "
                        "h.from_storage(1, v.data_ptr(), out.data_ptr(), 101)",
                   "heap-buffer-overflow")
    _expect_report(env, "h.shared_overflow(1000)", "heap-buffer-overflow")
    _expect_report(env, "h.add_ints(2**31 - 1, 1)", "signed integer overflow")
    clean = _run_sanitized(env, "assert h.add_ints(2, 3) == 5; "
                                "print(h.check_preconditions('mma', 0) or 'ok')")
    assert clean.returncode == 0 and clean.stdout.strip() == "ok", clean.stderr[-3000:]


def test_host_kernels_under_address_sanitizer(sanitized_host):
    """Every kernel of this file's serial-executor tests (all dtypes, layouts, options, shapes,
    tile widths, tensor-core chunks, bwd_dz runs) in the ASan + UBSan build: no access outside
    a tensor or a block's shared memory, no undefined behaviour. The CPU's counterpart of
    compute-sanitizer's memcheck on the GPU (scripts/cuda_sanitize.sh). The threads executor's
    fibers are left out: AddressSanitizer does not follow their stack switches."""
    env = sanitized_host
    r = subprocess.run(
        # -s and unbuffered: a sanitizer report ends the process at once, and would otherwise
        # be lost in pytest's capture of the failing test, with the progress written so far
        [sys.executable, "-u", "-m", "pytest", __file__, "-q", "-s", "-p", "no:xdist", "-p",
         "no:cacheprovider", "-k", "not race_free and not threads_executor and not sanitiz"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    tail = (r.stdout[-3000:] + r.stderr[-6000:])
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# ------------------------------------------------------------ launches per call


def _launches(fn, launch):
    """(fn's result, what it launched by name): the host build's kernels ``fn`` runs through
    the recording launcher it gets, and every aten op outside them that would launch a kernel
    on a GPU (tests/launches.py)."""
    launched = []

    def recording(kernel, *args):
        launched.append(kernel)
        launch(kernel, *args)

    with AtenLaunches(launched):
        result = fn(recording)
    return result, launched


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opts", [OPTION_SETS[0], OPTION_SETS[1]], ids=["plain", "all"])
def test_host_kernels_per_call(host, opts, layout):
    """What one forward and one backward launch (what the ops run), small ops included: at the
    late stages' sizes (7x7 maps) a launch costs about what the fused kernels' work does.
    Forward: pack (the weights' transposes and fp32 copies, one launch), prep, (pool's mean,)
    fwd. Backward: pack, prep, bwd_tile, the dense weight gradients' GEMMs (cuBLAS on a GPU),
    (pool's term of dz,) bwd_dz, bwd_dx (under prenorm in NHWC memory it also writes LN_C(x)
    pixel-major for the proj / down GEMMs), the proj / down GEMMs and bwd_finish, which sums,
    casts and writes every weight gradient flat. In NCHW memory the pixel-major views of
    grad_out and x for the GEMMs are copies, and under prenorm a LayerNorm of x follows."""
    from mslora_kernels.cuda.mslora import backward_flat_impl

    o, x, wt, gout = _case((2, 64, 7, 7, 128, 4, (3, 5, 7)), torch.bfloat16, opts, layout)
    launch, smem_bytes, limit = _launcher(host, 227 * 1024)
    (out, zmean), fwd = _launches(lambda la: forward_impl(x, wt, o, la, smem_bytes, limit),
                                  launch)
    (dx, flat), bwd = _launches(
        lambda la: backward_flat_impl(gout, x, wt, o, zmean, la, smem_bytes, limit), launch)
    pool = prenorm = bool(opts)
    copy = ["aten.clone"] * (layout == "nchw")
    assert fwd == ["pack", "prep"] + ["aten.mean"] * pool + ["fwd"], fwd
    assert bwd == ["pack", "prep", "bwd_tile", "aten.mm", *copy, "aten.bmm"] + \
        ["bwd_pool"] * pool + ["bwd_dz", "bwd_dx", *copy] + \
        ["aten.native_layer_norm"] * (prenorm and layout == "nchw") + \
        ["aten.bmm", "aten.bmm", "bwd_finish"], bwd
    _reference_checker(x, wt, o, gout)(out, dx, split_flat_grads(flat, o))
