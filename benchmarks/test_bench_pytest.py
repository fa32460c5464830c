"""pytest-benchmark tests for the same providers as ``python -m benchmarks.run``.

    pytest benchmarks --benchmark-only                 # on a GPU: the --quick shapes, bf16
    pytest benchmarks --benchmark-only                 # on a CPU: eager at tiny sizes only

On a GPU each call ends with a synchronize, so pytest-benchmark's wall clock covers the kernels;
the runner (CUDA events, rotated inputs, floors) is the measurement of record, this is the
familiar view. A provider that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from . import floors, presets, providers
from .run import n_input_sets

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

if HAS_CUDA:
    CASES = [(presets.shapes_of(presets.PRESETS[name], [stage])[0], layouts[0], "bf16")
             for name, stage, layouts in presets.QUICK]
    RANK = presets.DEFAULT_RANK
else:
    CASES = [(presets.shapes_of(presets.TINY)[0], "channels_first", "fp32")]
    RANK = presets.TINY_RANK


def _case_id(case) -> str:
    shape, layout, dtype = case
    return f"{shape.preset}-{shape.label}-{layout}-{dtype}"


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["eager", "compile", "triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mslora(benchmark, case, provider, mode):
    shape, layout, dtype_name = case
    if not HAS_CUDA and provider != "eager":
        pytest.skip("no CUDA device: only the eager reference runs on a CPU (numbers mean "
                    "nothing for the GPU)")
    reason = providers.unavailable(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    if not HAS_CUDA:
        torch.set_num_threads(1)  # see run.main: shared CPUs make OpenMP threads spin
    dtype = providers.DTYPES[dtype_name]
    base = providers.make_base(shape.c, RANK, presets.DEFAULT_GROUPS,
                               presets.DEFAULT_KERNEL_SIZES, layout, dtype, DEVICE)
    elem = torch.empty((), dtype=dtype).element_size()
    nsets = n_input_sets(shape.n * shape.c * shape.h * shape.w * elem, DEVICE)
    xs = [providers.make_input(shape.n, shape.c, shape.h, shape.w, layout, dtype, DEVICE, seed=i)
          for i in range(nsets)]
    ds = [torch.randn_like(x).detach() for x in xs]
    fn, detail = providers.build(provider, base)
    resets = xs + [p for p in fn.parameters() if p.requires_grad]
    idx = itertools.cycle(range(nsets))

    def call():
        i = next(idx)
        out = fn(xs[i])
        if mode == "fwd+bwd":
            out.backward(ds[i])
        if HAS_CUDA:
            torch.cuda.synchronize()

    def reset():
        for t in resets:
            t.grad = None

    call()  # compile (where the provider compiles) outside the measurement
    benchmark.group = f"{_case_id(case)} {mode}"
    f = floors.floors(mode, shape.n, shape.c, shape.h, shape.w, RANK, presets.DEFAULT_GROUPS,
                      presets.DEFAULT_KERNEL_SIZES, elem, None, None)
    benchmark.extra_info.update(provider_detail=detail, min_bytes=f["min_bytes"],
                                depthwise_fmas=f["fmas"], device=str(DEVICE))
    if not HAS_CUDA:
        benchmark.extra_info["note"] = "CPU: these numbers mean nothing for the GPU"
    benchmark.pedantic(call, setup=reset, rounds=30 if HAS_CUDA else 5, warmup_rounds=3,
                       iterations=1)
