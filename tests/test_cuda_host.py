"""The CUDA MSLoRA kernels' bodies (csrc/mslora.cuh), built for the CPU with the host compiler
and run through the real launcher orchestration (mslora_kernels.cuda.mslora.forward_impl /
backward_impl), against the reference and its autograd: every option, both physical layouts,
odd shapes, fp32. This checks the algorithm, the tiling, halos, shuffle and every gradient
without a GPU; the GPU tests (test_cuda_mslora.py) check the device build."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mslora_kernels import MSLoRA
from mslora_kernels.cuda.mslora import backward_impl, forward_impl
from mslora_kernels.reference import mslora as reference
from mslora_kernels.testing import check_close

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    pybind11 = pytest.importorskip("pybind11")
    out = tmp_path_factory.mktemp("host") / ("mslora_host" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [CXX, "-O2", "-shared", "-fPIC", "-std=c++17", f"-I{ROOT / 'csrc'}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           str(ROOT / "tests" / "host" / "mslora_host.cpp"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("mslora_host", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("layout", LAYOUTS)
# (N, C, H, W, D, G, kernel sizes), shared-memory limit. Edges of the depthwise runs and halo
# loads: W not a multiple of the tile width; D % 4 == 0 (16-byte halo loads) and not; D not a
# multiple of either channel chunk (32, 16); k = 1; k = 9 (not specialised); H, W smaller
# than the halo.
@pytest.mark.parametrize("shape,smem", [((2, 12, 11, 9, 8, 4, (3, 5)), 227 * 1024),
                                        ((1, 6, 5, 13, 6, 3, (3, 7, 1)), 40 * 1024),
                                        ((1, 8, 6, 10, 36, 4, (5, 1)), 227 * 1024),
                                        ((2, 6, 3, 4, 6, 2, (9, 3)), 227 * 1024),
                                        ((1, 4, 2, 3, 20, 2, (7, 3)), 227 * 1024)],
                         ids=["odd", "small-smem", "d36-k1", "k9-tiny", "d20-k7-tiny"])
def test_host_kernels_match_reference(host, opts, layout, shape, smem):
    n, c, h, w, d, g, ks = shape
    fmt = "channels_last" if layout == "nhwc" else "channels_first"
    m = _module(c, d, g, ks, opts, fmt)
    o = m.options
    x64 = torch.randn(n, c, h, w, dtype=torch.float64)
    if layout == "nhwc":
        x64 = x64.permute(0, 2, 3, 1).contiguous()
    elif layout == "channels_last_memory":
        x64 = x64.contiguous(memory_format=torch.channels_last)
    x64.requires_grad_(True)
    w64 = dict(m.named_parameters())
    ref = reference(x64, w64, o)
    gout = torch.randn_like(ref)
    grads64 = torch.autograd.grad(ref, [x64, *w64.values()], gout)

    x = x64.detach().float()
    w32 = {k: v.detach().float() for k, v in w64.items()}
    launcher = _launcher(host, smem)
    out, zmean = forward_impl(x, w32, o, *launcher)
    assert out.stride() == x.stride()
    check_close("out", out, ref, torch.float32)
    dx, grads = backward_impl(gout.float(), x, w32, o, zmean, *launcher)
    assert dx.stride() == x.stride()
    check_close("grad x", dx, grads64[0], torch.float32)
    assert set(grads) == set(w64)
    for (name, gref) in zip(w64, grads64[1:]):
        assert grads[name].shape == gref.shape and grads[name].dtype == torch.float32
        check_close(f"grad {name}", grads[name], gref, torch.float32)


@pytest.mark.parametrize("tile_w", [5, 12])  # one partial run of 8; a full and a partial run
@pytest.mark.parametrize("ks", [(7, 3), (9, 1)], ids=["k7", "k9"])  # specialised, generic
@pytest.mark.parametrize("opts", OPTION_SETS[1:3], ids=lambda o: "+".join(o))
def test_host_kernels_other_tile_widths(host, opts, ks, tile_w, monkeypatch):
    import mslora_kernels.cuda.mslora as launcher

    monkeypatch.setattr(launcher, "TILE_W", tile_w)
    test_host_kernels_match_reference(host, opts, "nchw", (2, 8, 7, 29, 12, 4, ks), 227 * 1024)


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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
