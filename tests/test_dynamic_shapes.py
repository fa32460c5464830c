"""torch.compile with dynamic shapes: batches, maps and token counts that change between calls.

``torch.compile`` recompiles with symbolic sizes as soon as a size changes (the last, smaller batch
of an epoch; multi-scale or detection training), so every fused op must trace with symbolic N, H
and W: the Triton launchers run on them inside ``triton_op``'s decomposition, the CUDA ops
through their fake impls.

- On the CPU (CI): ``tests/trace_dynamic.py`` traces every case (MSLoRA on both fused backends,
  options, layouts, deterministic, autocast, workspace slices; a ResNet and a Swin with MSLoRA
  injected; Serial LoRA and MSPLoRA) through AOTAutograd's forward and backward, the path
  Inductor takes, without running a kernel.
- On the GPU: Inductor compiles the modules over changing sizes, and the results match SPEC.

The same trace also exports the modules with ``torch.export`` as on a GPU (dynamic sizes, saved
and loaded), for the CUDA backend too; ``tests/test_export.py`` runs exported programs.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_triton_mslora import LAYOUT_IDS, LAYOUTS, make_input, make_module, ref64

from mslora_kernels.backends import cuda_extension
from mslora_kernels.testing import check_close

HERE = Path(__file__).parent
# (sorted; the taps are packed once in the forward, once in the backward; with pool the backward
# also runs _bwd_pool_kernel)
MSLORA_TRITON = ["_bwd_dz_kernel", "_bwd_finish_kernel", "_bwd_main_kernel", "_bwd_z_kernel",
                 "_mslora_f1_kernel", "_mslora_f2_kernel", "_pack_taps_kernel",
                 "_pack_taps_kernel"]
MSLORA_CUDA = ["mslora.cuda_bwd", "mslora.cuda_fwd"]
FAMILIES = {  # case-name prefix: (cases, what one adapter's joint graph launches per slice)
    "mslora-triton": (14, MSLORA_TRITON),
    "mslora-cuda": (14, MSLORA_CUDA),
    "model-triton": (2, MSLORA_TRITON),
    "model-cuda": (2, MSLORA_CUDA),
    "lora": (2, ["_lora_linear_kernel", "_lora_linear_kernel"]),  # forward, input gradient
}
# torch.export (trace_dynamic.export_cases): case-name prefix: (cases, the ops one adapter's
# program calls, the input dims that stay dynamic per case-name suffix)
EXPORT_FAMILIES = {
    "export-mslora-triton": (3, ["mslora.triton_fwd"]),
    "export-mslora-cuda": (3, ["mslora.cuda_fwd"]),
    "export-model-triton": (2, ["mslora.triton_fwd"]),
    "export-model-cuda": (2, ["mslora.cuda_fwd"]),
    "export-lora": (2, ["mslora.lora_linear"]),
}
EXPORT_DYNAMIC = {"nchw": [True, False, True, True], "nchw_cl_memory": [True, False, True, True],
                  "nhwc": [True, True, True, False], "resnet": [True, False, True, True],
                  "swin": [True, False, False, False], "serial": [True, True, False],
                  "msplora": [True, True, False]}
TORCH_BEFORE_2_11 = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11)
MODEL_ADAPTERS = {"resnet": 3, "swin": 2}  # MSLoRA modules inject() places in each test model


@pytest.fixture(scope="module")
def traced():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(HERE / "trace_dynamic.py")], env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    return {c["case"]: c for c in map(json.loads, r.stdout.splitlines())}


def _family_cases(traced, family, count):
    """The traced cases whose name starts with ``family``: ``count`` of them, none with an
    error (skipped for the CUDA backend when the extension is not built)."""
    if family.endswith("-cuda") and cuda_extension() is None:
        pytest.skip("mslora_kernels._C is not built")
    cases = {name: c for name, c in traced.items() if name.startswith(family)}
    assert len(cases) == count, sorted(cases)
    for name, c in cases.items():
        assert c["error"] is None, f"{name}:\n{c['error']}"
    return cases


@pytest.mark.slow
@pytest.mark.xdist_group("trace_dynamic")  # one worker runs the (minutes-long) trace, once
@pytest.mark.timeout(900)  # the first test pays for the trace
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_ops_trace_with_dynamic_sizes(traced, family):
    """Three calls of different N, H and W: one static compilation, then one with symbolic sizes
    that also serves the third call; each joint graph launches the forward and backward kernels
    (several times over when the workspace budget cuts the batch into slices)."""
    count, launches = FAMILIES[family]
    for name, c in _family_cases(traced, family, count).items():
        expected = [[False, True]]
        if name.endswith("-sliced") and family == "mslora-triton" and TORCH_BEFORE_2_11:
            # torch 2.7 guards on the slice starts' sym_min (the remainder of N over the slice
            # count), so its third call, 11 images after 10, compiles once more (still dynamic)
            expected.append([False, True, True])
        assert c["dynamic"] in expected and c["compilations"] == len(c["dynamic"]), (name, c)
        for launched in c["launched"]:
            times = collections.Counter(launched)
            if family.startswith("model-"):  # each adapter once
                adapters = MODEL_ADAPTERS[name.rsplit("-", 1)[1]]
                assert times == collections.Counter(launches * adapters), (name, times)
            elif name.endswith("-sliced") and family == "mslora-triton":
                assert set(times) == set(launches) | {"_bwd_pool_kernel"}, (name, times)
                assert times["_bwd_main_kernel"] > 1, (name, times)
            elif family == "mslora-triton" and "-all-" in name:
                assert launched == sorted(launches + ["_bwd_pool_kernel"]), (name, launched)
            else:
                assert launched == launches, (name, launched)


@pytest.mark.slow
@pytest.mark.xdist_group("trace_dynamic")
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", list(EXPORT_FAMILIES))
def test_fused_ops_export_with_dynamic_sizes(traced, family):
    """torch.export as on a GPU, with dynamic sizes, then saved and loaded: the program calls each
    adapter's fused op once, as one opaque op (no Triton kernel in it), and its input keeps its
    dynamic sizes (tests/test_export.py runs such programs)."""
    count, ops = EXPORT_FAMILIES[family]
    for name, c in _family_cases(traced, family, count).items():
        kind = name.rsplit("-", 1)[1]
        assert c["ops"] == ops * MODEL_ADAPTERS.get(kind, 1), (name, c["ops"])
        assert c["dynamic"] == EXPORT_DYNAMIC[kind], (name, c["dynamic"])


# ------------------------------------------------------------------------------------------
# On the GPU: Inductor over changing sizes
# ------------------------------------------------------------------------------------------
SIZES = ((3, 13, 9), (2, 17, 11), (5, 9, 15), (4, 13, 9))  # N, H, W


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("fmt,mem", LAYOUTS, ids=LAYOUT_IDS)
def test_gpu_compiled_module_follows_changing_sizes(backend, fmt, mem, no_tf32):
    """torch.compile(fullgraph=True) of the module, fed batches whose N, H and W all change:
    forward and every gradient within SPEC's float32 tolerance of the float64 reference."""
    if backend == "cuda" and cuda_extension() is None:
        pytest.skip("mslora_kernels._C is not built")
    opts = {"pool": True, "gate": True, "prenorm": True}
    m = make_module(opts, fmt, c=40, d=24, g=4, backend=backend, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    for n, h, w in SIZES:
        x = make_input(fmt, mem, n=n, c=40, h=h, w=w, device="cuda").requires_grad_()
        out = compiled(x)
        gout = torch.randn_like(out)
        m.zero_grad(set_to_none=True)
        out.backward(gout)
        want, want_grads = ref64(m, x, gout)
        size = f"{backend} {fmt} {mem} {(n, h, w)}"
        check_close(f"out {size}", out, want, torch.float32)
        check_close(f"grad x {size}", x.grad, want_grads["x"], torch.float32)
        for k, p in m.named_parameters():
            check_close(f"grad {k} {size}", p.grad, want_grads[k], torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["serial", "msplora"])
def test_gpu_compiled_lora_follows_changing_token_counts(kind, no_tf32):
    """The fused LoRA linears under torch.compile(fullgraph=True) with batch and token counts
    that change: output and gradients match the same module run eagerly on the reference."""
    from mslora_kernels import lora

    base = torch.nn.Linear(48, 48).cuda()
    if kind == "serial":
        mod = lora.SerialLoRALinear(base, lora.LoRAPair(48, 48, 8).cuda(), 2.0, backend="triton")
    else:
        pairs = [(lv, lora.LoRAPair(48, 48, 4).cuda(), 0.5, True) for lv in lora.MSP_LEVELS]
        mod = lora.MSPLoRALinear(base, pairs, backend="triton")
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.2)
    compiled = torch.compile(mod, fullgraph=True)
    for n, t in ((4, 197), (3, 50), (7, 13)):
        x = torch.randn(n, t, 48, device="cuda", requires_grad=True)
        out = compiled(x)
        gout = torch.randn_like(out)
        params = [p for p in mod.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out, [x, *params], gout)
        mod.backend = "reference"
        try:
            want = mod(x)
            want_grads = torch.autograd.grad(want, [x, *params], gout)
        finally:
            mod.backend = "triton"
        check_close(f"{kind} out {(n, t)}", out, want.double(), torch.float32)
        for i, (g, wg) in enumerate(zip(grads, want_grads, strict=True)):
            check_close(f"{kind} grad {i} {(n, t)}", g, wg.double(), torch.float32)
