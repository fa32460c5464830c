"""Traces every fused op under ``torch.compile`` with dynamic shapes, on a machine without a GPU.

Run by ``tests/test_dynamic_shapes.py`` in a subprocess (Triton must be imported without
``TRITON_INTERPRET``, so that ``wrap_triton`` records kernel launches instead of running them).
Prints one JSON line per case.

Each case compiles a module's forward and backward through AOTAutograd, the path Inductor takes on
a GPU: the Triton ops' Python launchers run on fake tensors with symbolic sizes
(``triton_op``'s functional decomposition, with Inductor's TTIR analysis of every kernel
launched, against an sm_90 target), the CUDA ops through their fake impls. It calls the compiled
function on three inputs of different N, H and W: the first compiles with static sizes, the second
recompiles with dynamic ones (as ``torch.compile`` does by default when sizes change), the third
must reuse that. The compiled graphs are never run (there is no GPU): the compiler hands back a
function that stops the call. A case reports the compilations, what each joint (forward +
backward) graph launches (Triton kernels by name, the CUDA ops by op name), whether its inputs
have symbolic sizes, and any error. ``python tests/trace_dynamic.py [name filter]`` runs the
cases whose name contains the filter.

The export cases (``export-*``) export a module with ``torch.export`` and dynamic sizes, save and
load the program, and report the package's ops it calls and which of its input's sizes are
symbolic (:func:`run_export_case`).

The modules refuse CUDA-only backends on CPU tensors, so the backends' device checks judge CPU
tensors as CUDA ones; every other check (Triton installed, the extension built) runs as it is.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from test_export import package_op_calls, saved_and_loaded  # noqa: E402
from test_triton_mslora import LAYOUT_IDS, LAYOUTS, OPTION_SETS, make_input, make_module  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch.partitioners import default_partition  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch.export import Dim  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import mslora_kernels.backends as backends  # noqa: E402
import mslora_kernels.lora as lora  # noqa: E402
from mslora_kernels import MSLoRA, MSLoRAConfig, inject  # noqa: E402
from mslora_kernels.models import ResNet, SwinTransformer  # noqa: E402


class _Sm90Driver:
    """What Inductor's TTIR analysis of a launched kernel asks of Triton's (absent) CUDA driver."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_benchmarker(self):
        """Asked for, never called, by the one-config Autotuner that torch 2.7 wraps a launch in."""
        def bench(*args, **kwargs):
            raise RuntimeError("trace_dynamic: there is no GPU to benchmark on")
        return bench


def _as_if_cuda(check):
    """A backend check that judges CPU tensors as it would CUDA ones (every other check runs)."""
    return lambda device: check(torch.device("cuda") if device.type == "cpu" else device)


class _Stop(Exception):
    """Raised instead of running a compiled graph."""


_joints: list = []


def _partition(joint, inputs, **kwargs):
    _joints.append(joint)
    return default_partition(joint, inputs, **kwargs)


def _no_run(gm, example_inputs):
    def run(*args):
        raise _Stop
    return run


BACKEND = aot_autograd(fw_compiler=_no_run, bw_compiler=_no_run, partition_fn=_partition)
SHAPES = ((3, 5, 6), (4, 7, 9), (5, 11, 4))  # (N, H, W): three different in every size
SLICED_SHAPES = ((4, 64, 21), (10, 64, 21), (11, 64, 21))
ALL = OPTION_SETS[-1]  # every option on


def _mslora_case(backend, opts, fmt, mem, dtype, deterministic):
    m = make_module(opts, fmt, c=8, d=16, g=2, kernel_sizes=(3, 5), backend=backend,
                    deterministic=deterministic)

    def inputs(n, h, w):
        return (make_input(fmt, mem, n=n, c=8, h=h, w=w).requires_grad_(),)

    def step(x):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return m(x).float().sum()

    return step, inputs


def _lora_module(kind):
    base = torch.nn.Linear(24, 24)
    if kind == "serial":
        pair = lora.LoRAPair(24, 24, 4)
        mod = lora.SerialLoRALinear(base, pair, 2.0, backend="triton")
    else:
        pairs = [(level, lora.LoRAPair(24, 24, 4), 0.5, True) for level in lora.MSP_LEVELS]
        mod = lora.MSPLoRALinear(base, pairs, backend="triton")
    for p in mod.parameters():
        torch.nn.init.normal_(p)
    return mod


def _lora_case(kind):
    mod = _lora_module(kind)

    def inputs(n, h, w):  # tokens: (batch, sequence, features)
        return (torch.randn(n, h * w, 24, requires_grad=True),)

    return (lambda x: mod(x).sum()), inputs


def _injected_model(kind, backend):
    """A small ResNet or Swin with MSLoRA injected, in training mode."""
    if kind == "resnet":
        model = ResNet(layers=(1, 1, 1), widths=(8, 16, 32), in_chans=3, num_classes=5)
    else:
        model = SwinTransformer(img_size=16, patch_size=2, embed_dim=16, depths=(1, 1),
                                num_classes=5)
    inject(model, MSLoRAConfig(rank=8, groups=2, backend=backend, trainable=["fc", "head"]))
    for m in model.modules():
        if isinstance(m, MSLoRA):
            torch.nn.init.normal_(m.up.weight)
    return model.train()


def _model_case(kind, backend):
    """A small ResNet (N, H and W change) or Swin (N changes) with MSLoRA injected: the hooks,
    token grids and adapters of a training step, with the classifier's loss."""
    model = _injected_model(kind, backend)

    def inputs(n, h, w):
        shape = (n, 3, 2 * h, 2 * w) if kind == "resnet" else (n, 3, 16, 16)
        return (torch.randn(shape),)

    return (lambda x: model(x).logsumexp(-1).sum()), inputs


def _launched(graph) -> list[str]:
    """The kernels a joint graph launches: Triton kernels by name, the CUDA ops by op name."""
    names = []
    for nd in graph.nodes:
        if "triton_kernel_wrapper" in str(nd.target):
            names.append(kernel_side_table.get_kernel(nd.kwargs["kernel_idx"]).fn.__name__)
        elif str(nd.target).startswith("mslora."):
            names.append(str(nd.target).removesuffix(".default"))
    return sorted(names)


def run_case(name, build, shapes=SHAPES, workspace_mb=None):
    torch._dynamo.reset()
    _joints.clear()
    result = {"case": name, "error": None}
    saved_budget = os.environ.get("MSLORA_WORKSPACE_MB")
    if workspace_mb is not None:
        os.environ["MSLORA_WORKSPACE_MB"] = str(workspace_mb)
    try:
        step, inputs = build()
        compiled = torch.compile(step, backend=BACKEND, fullgraph=True)
        for size in shapes:
            try:
                compiled(*inputs(*size))
            except _Stop:
                pass
    except Exception:
        result["error"] = traceback.format_exc(limit=-8)
    finally:
        os.environ.pop("MSLORA_WORKSPACE_MB", None)
        if saved_budget is not None:
            os.environ["MSLORA_WORKSPACE_MB"] = saved_budget
    result["compilations"] = len(_joints)
    result["launched"] = [_launched(j.graph) for j in _joints]
    result["dynamic"] = [any(isinstance(s, torch.SymInt)
                             for nd in j.graph.nodes if nd.op == "placeholder"
                             for s in getattr(nd.meta.get("val"), "shape", ()))
                         for j in _joints]
    return result


def run_export_case(name, build):
    """``torch.export`` of a module as on the GPU, with dynamic sizes, then saved and loaded: the
    package's ops the loaded program calls (in every subgraph), and whether its input's sizes are
    symbolic. ``build()`` gives the module, its example input and the input's dynamic dims."""
    result = {"case": name, "error": None, "ops": None, "dynamic": None}
    try:
        module, x, dims = build()
        ep = saved_and_loaded(torch.export.export(module, (x,), dynamic_shapes={"x": dims}))
        result["ops"] = package_op_calls(ep)
        (user_input,) = ep.graph_signature.user_inputs
        shape = next(nd for nd in ep.graph.nodes if nd.name == user_input).meta["val"].shape
        result["dynamic"] = [isinstance(s, torch.SymInt) for s in shape]
    except Exception:
        result["error"] = traceback.format_exc(limit=-8)
    return result


def export_cases():
    """(name, build) for every export case: MSLoRA with every option in each layout, the
    injected models (ResNet: N, H and W dynamic; Swin: N), Serial LoRA and MSPLoRA (batch and
    tokens)."""
    n, h, w = Dim("n", min=1, max=1024), Dim("h", min=1, max=1024), Dim("w", min=1, max=1024)
    out = []
    for backend in ("triton", "cuda"):
        for (fmt, mem), layout in zip(LAYOUTS, LAYOUT_IDS):
            def build(b=backend, f=fmt, m=mem):
                module = make_module(ALL, f, c=8, d=16, g=2, kernel_sizes=(3, 5), backend=b)
                dims = {0: n, 2: h, 3: w} if f == "channels_first" else {0: n, 1: h, 2: w}
                return module, make_input(f, m, n=3, c=8, h=5, w=6), dims
            out.append((f"export-mslora-{backend}-all-{layout}", build))
        out.append((f"export-model-{backend}-resnet",
                    lambda b=backend: (_injected_model("resnet", b), torch.randn(2, 3, 9, 7),
                                       {0: n, 2: Dim("h5", min=5, max=1024),
                                        3: Dim("w5", min=5, max=1024)})))
        out.append((f"export-model-{backend}-swin",
                    lambda b=backend: (_injected_model("swin", b), torch.randn(2, 3, 16, 16),
                                       {0: n})))
    out += [(f"export-lora-{k}", lambda k=k: (_lora_module(k), torch.randn(2, 17, 24),
                                              {0: n, 1: Dim("tokens", min=1, max=4096)}))
            for k in ("serial", "msplora")]
    return out


def cases():
    """(name, build, keyword arguments of run_case) for every case."""
    out = []
    for backend in ("triton", "cuda"):
        for opts_name, opts in (("plain", {}), ("all", ALL)):
            for (fmt, mem), layout in zip(LAYOUTS, LAYOUT_IDS):
                for det in (False, True):
                    out.append((f"mslora-{backend}-{opts_name}-{layout}-fp32-det{int(det)}",
                                lambda b=backend, o=opts, f=fmt, m=mem, d=det:
                                _mslora_case(b, o, f, m, torch.float32, d), {}))
        out.append((f"mslora-{backend}-all-nchw-bf16-autocast",
                    lambda b=backend: _mslora_case(b, ALL, "channels_first", None,
                                                   torch.bfloat16, False), {}))
        # A 1 MiB workspace budget cuts these batches into several slices, forward and backward.
        out.append((f"mslora-{backend}-all-nchw-fp32-sliced",
                    lambda b=backend: _mslora_case(b, ALL, "channels_first", None,
                                                   torch.float32, False),
                    {"shapes": SLICED_SHAPES, "workspace_mb": 1}))
        out += [(f"model-{backend}-{kind}", lambda b=backend, k=kind: _model_case(k, b), {})
                for kind in ("resnet", "swin")]
    out += [(f"lora-{k}", lambda k=k: _lora_case(k), {}) for k in ("serial", "msplora")]
    return out


def main(only: str = ""):
    triton.runtime.driver.set_active(_Sm90Driver())
    backends.triton_unavailable_reason = _as_if_cuda(backends.triton_unavailable_reason)
    backends.cuda_unavailable_reason = _as_if_cuda(backends.cuda_unavailable_reason)
    lora.triton_unavailable_reason = backends.triton_unavailable_reason
    for name, build, kwargs in cases():
        if only not in name:
            continue
        print(json.dumps(run_case(name, build, **kwargs)), flush=True)
    for name, build in export_cases():
        if only not in name:
            continue
        print(json.dumps(run_export_case(name, build)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
