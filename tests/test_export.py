"""torch.export of the adapted modules and models: what a user deploys, or fine-tunes further,
as an ExportedProgram saved to a file.

An exported program keeps each fused op as one opaque call (``mslora.triton_fwd``,
``mslora.cuda_fwd``, ``mslora.lora_linear``; export does not decompose a ``triton_op``, so the
program holds no Triton source), takes dynamic N, H and W (batch and token count for the LoRA
family), survives ``torch.export.save`` / ``load`` (the loading process imports mslora_kernels,
which registers the ops), and computes exactly what the eager module computes, forward and
backward: each op's autograd goes with it. "Exactly" is bitwise: the backwards run
deterministic, so both sides run the same kernels in the same order.

CPU: the reference and the Triton kernels under the interpreter. GPU: Triton and CUDA.
``tests/test_dynamic_shapes.py`` traces the same exports for the GPU's backends on the CPU.
"""

from __future__ import annotations

import io

import pytest
import torch
from test_training import make_model
from test_triton_mslora import LAYOUT_IDS, LAYOUTS, OPTION_SETS, make_input, make_module
from torch.export import Dim

from mslora_kernels import MSLoRA, MSLoRAConfig, available_backends, inject
from mslora_kernels.lora import MSP_LEVELS, LoRAPair, MSPLoRALinear, SerialLoRALinear
from mslora_kernels.models import VisionTransformer
from mslora_kernels.testing import rel_error

FUSED_OPS = {"triton": {"mslora.triton_fwd"}, "cuda": {"mslora.cuda_fwd"}, "reference": set()}
ALL = OPTION_SETS[-1]  # every option on
C, D, G, KS = 12, 8, 2, (3, 5)
# (N, H, W): the example the export traces, then calls with every size changed (a batch of one
# included)
EXAMPLE, CALLS = (2, 7, 9), ((3, 5, 11), (1, 9, 4))
# torch 2.9's torch.export.load gives every parameter requires_grad=True, the frozen backbone's
# included (its deserializer re-made each as nn.Parameter() without the saved flag; fixed by
# pytorch/pytorch#164290, absent from 2.9; 2.7, 2.8, 2.11, 2.13 and 2.15 keep the flags)
LOAD_MAKES_ALL_TRAINABLE = tuple(int(v) for v in torch.__version__.split(".")[:2]) == (2, 9)


def package_op_calls(ep) -> list[str]:
    """The package's ops the program calls, one entry per call (sorted), in its graph and every
    subgraph (autocast regions). Also tests/trace_dynamic.py's."""
    return sorted(str(n.target).removesuffix(".default")
                  for gm in ep.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
                  for n in gm.graph.nodes
                  if n.op == "call_function" and str(n.target).startswith("mslora."))


def _mslora_ops(ep) -> set[str]:
    return set(package_op_calls(ep))


def saved_and_loaded(ep):
    """``ep`` through torch.export.save and load (in memory). Also tests/trace_dynamic.py's."""
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


def _trainable(module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _run(module, x, g, names):
    """The output, and the gradients of x and of the parameters ``names``."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(y, [x, *(params[n] for n in names)], g)
    return y, dict(zip(["x", *names], grads, strict=True))


def _check_same(program, eager, x, grad_tol=0.0):
    """The loaded program against the eager module: the same trainable parameters, and bitwise
    the same output and gradients (x's and the trainable parameters'; within ``grad_tol``,
    relative, where the rest of the model's backward on the GPU is not bitwise reproducible:
    cuDNN's and attention's backwards may accumulate with atomics)."""
    names = _trainable(eager)
    if not LOAD_MAKES_ALL_TRAINABLE:
        # Compared as sets: torch 2.7 lists an exported program's parameters in the order its
        # graph first uses them (the reference adapter's pw first), 2.8 on in the module's.
        assert sorted(_trainable(program)) == sorted(names)
    g = torch.randn_like(eager(x))
    y, grads = _run(program, x, g, names)
    y_eager, grads_eager = _run(eager, x, g, names)
    assert torch.equal(y, y_eager), f"output differs by {(y - y_eager).abs().max().item():.3g}"
    for name, gr in grads.items():
        if grad_tol:
            err = rel_error(gr, grads_eager[name])
            assert err <= grad_tol, f"gradient of {name} differs by {err:.3g} (relative)"
        else:
            assert torch.equal(gr, grads_eager[name]), f"gradient of {name} differs"


def _export(module, x, dims):
    """Exported with the given dynamic dims of x, saved and loaded; the loaded program."""
    ep = torch.export.export(module, (x,), dynamic_shapes={"x": dims})
    return saved_and_loaded(ep)


def _mslora_case(backend, opts, fmt, mem, device, dtype=torch.float32):
    m = make_module(opts, fmt, c=C, d=D, g=G, kernel_sizes=KS, backend=backend, device=device,
                    deterministic=True).to(dtype)
    n, h, w = Dim("n", min=1, max=1024), Dim("h", min=1, max=1024), Dim("w", min=1, max=1024)
    dims = {0: n, 2: h, 3: w} if fmt == "channels_first" else {0: n, 1: h, 2: w}

    def inp(size):
        return make_input(fmt, mem, n=size[0], c=C, h=size[1], w=size[2], device=device,
                          dtype=dtype)

    program = _export(m, inp(EXAMPLE), dims)
    assert _mslora_ops(program) == FUSED_OPS[backend]
    for size in CALLS:
        _check_same(program.module(), m, inp(size))


def _backend_marks(backend):
    return [pytest.mark.interpreter] if backend == "triton" else []


CPU_BACKENDS = [pytest.param(b, marks=_backend_marks(b)) for b in ("reference", "triton")]
LAYOUT_CASES = [pytest.param(fmt, mem, id=i) for (fmt, mem), i in zip(LAYOUTS, LAYOUT_IDS,
                                                                      strict=True)]


@pytest.mark.parametrize("fmt, mem", LAYOUT_CASES)
@pytest.mark.parametrize("opts", [{}, ALL], ids=["plain", "all"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exported_mslora_matches_eager_cpu(backend, opts, fmt, mem):
    _mslora_case(backend, opts, fmt, mem, "cpu")


GPU_MSLORA = [pytest.param(b, opts, *LAYOUTS[lay], dt, id=f"{b}-{name}-{LAYOUT_IDS[lay]}-{dn}")
              for b in ("triton", "cuda")
              for opts, name, lay, dt, dn in (({}, "plain", 0, torch.float32, "fp32"),
                                              (ALL, "all", 1, torch.float32, "fp32"),
                                              (ALL, "all", 2, torch.float32, "fp32"),
                                              (ALL, "all", 0, torch.bfloat16, "bf16"))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend, opts, fmt, mem, dtype", GPU_MSLORA)
def test_exported_mslora_matches_eager_gpu(backend, opts, fmt, mem, dtype, no_tf32):
    if backend not in available_backends("cuda"):
        pytest.skip(f"the {backend} backend is not available")
    _mslora_case(backend, opts, fmt, mem, "cuda", dtype)


# ------------------------------------------------------------------------------------------
# Injected models: the placement hooks and token grids trace too
# ------------------------------------------------------------------------------------------
def _model(kind, backend, device):
    """An injected model in training mode, its example input's (C, H, W) and its dynamic dims
    (Swin's windows and the ViT's position embedding fix the map size: only the batch changes)."""
    cfg = dict(kernel_sizes=KS, backend=backend)
    if kind in ("resnet", "swin"):
        model, (_, c, h, w) = make_model(kind, **cfg)
    else:
        torch.manual_seed(0)
        model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=5, reg_tokens=1)
        inject(model, MSLoRAConfig(rank=8, groups=2, trainable=["head"], **cfg))
        c, h, w = 3, 16, 16
    for m in model.modules():
        if isinstance(m, MSLoRA):
            m.deterministic = True
            with torch.no_grad():
                m.up.weight.normal_(0, 0.1)
    dims = {0: Dim("n", min=1, max=1024)}
    if kind == "resnet":  # from 5: the model's own layers guard the 1/4 map against 1x1 (torch's
        # contiguity checks; the plain ResNet exports so too)
        dims.update({2: Dim("h", min=5, max=1024), 3: Dim("w", min=5, max=1024)})
    return model.to(device), (c, h, w), dims


def _model_case(kind, backend, device):
    model, (c, h, w), dims = _model(kind, backend, device)
    program = _export(model, torch.randn(2, c, h, w, device=device), dims)
    assert _mslora_ops(program) == FUSED_OPS[backend]
    calls = [(3, h + 3, w + 5), (1, h, w)] if kind == "resnet" else [(3, h, w), (1, h, w)]
    grad_tol = 1e-5 if device == "cuda" else 0.0  # fp32, TF32 off
    for n, hh, ww in calls:
        _check_same(program.module(), model, torch.randn(n, c, hh, ww, device=device), grad_tol)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["resnet", "swin", "vit"])
def test_exported_model_matches_eager_cpu(kind):
    _model_case(kind, "triton", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_exported_model_matches_eager_gpu(kind, backend, no_tf32):
    if backend not in available_backends("cuda"):
        pytest.skip(f"the {backend} backend is not available")
    _model_case(kind, backend, "cuda")


# ------------------------------------------------------------------------------------------
# The LoRA family: one op, forward and input gradient
# ------------------------------------------------------------------------------------------
def _lora_case(kind, device):
    torch.manual_seed(0)
    d, r = 24, 4
    base = torch.nn.Linear(d, 3 * d).requires_grad_(False)
    if kind == "serial":
        mod = SerialLoRALinear(base, LoRAPair(d, d, r), 2.0, backend="triton")
    else:
        pairs = [(level, LoRAPair(d, 3 * d, r), 0.5, True) for level in MSP_LEVELS]
        mod = MSPLoRALinear(base, pairs, backend="triton")
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.3)
    mod.to(device)
    dims = {0: Dim("batch", min=1, max=1024), 1: Dim("tokens", min=1, max=4096)}
    program = _export(mod, torch.randn(2, 17, d, device=device), dims)
    assert _mslora_ops(program) == {"mslora.lora_linear"}
    for b, t in ((3, 50), (1, 5)):
        _check_same(program.module(), mod, torch.randn(b, t, d, device=device))


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["serial", "msplora"])
def test_exported_lora_matches_eager_cpu(kind):
    _lora_case(kind, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["serial", "msplora"])
def test_exported_lora_matches_eager_gpu(kind, no_tf32):
    _lora_case(kind, "cuda")
