"""Seeding, device and marker logic shared by every test file.

On a machine without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set
here, before anything imports triton, unless the caller already chose.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist: each worker its share of the cores, for torch here and for the subprocesses
    # tests start (torch's default, every core in every worker, made CPU-heavy tests 25-45x
    # slower when workers ran side by side)
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    # and Inductor's compile workers (by default one per core in every worker: 8 workers on 16
    # cores would start 128); read when torch._inductor.config is first imported, after this
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(_threads))

HAS_CUDA = torch.cuda.is_available()
NO_GPU = "needs a CUDA device; none is available here"  # the skip reason of the gpu marker
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# On a GPU, the test files in the order their verdicts matter (the GPU check's time limit may stop
# the run; pytest-xdist hands tests out in this order): the kernels against the reference first,
# then the integration (compile, slices, training, export, inject's FSDP refusals), then the LoRA
# GEMM and the benchmark runner.
GPU_FILE_ORDER = ("test_cuda_mslora.py", "test_triton_mslora.py", "test_triton_bwd.py",
                  "test_cuda_gelu.py", "test_triton_harness.py", "test_slices.py",
                  "test_training.py", "test_modules.py", "test_dynamic_shapes.py",
                  "test_export.py", "test_inject.py", "test_lora_triton.py",
                  "test_benchmarks.py")


def _gpu_file_rank(item) -> int:
    name = item.path.name
    return GPU_FILE_ORDER.index(name) if name in GPU_FILE_ORDER else len(GPU_FILE_ORDER)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        items.sort(key=_gpu_file_rank)  # stable: each file keeps its own order
    skip_gpu = pytest.mark.skip(reason=NO_GPU)
    skip_interp = pytest.mark.skip(
        reason="Triton interpreter tests run only with TRITON_INTERPRET=1 (set on CPU machines)"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(skip_interp)


# Under CI (CI=true: a machine of CI's kind, with nvcc, g++ and the 'test' extra; no GPU), a test
# may skip only for these reasons: anything else is a missing install step or a broken check
# that a green run would hide (the host tests once skipped whole for a missing pybind11), so it
# fails the run. timm and torchvision cannot sit beside CI's CPU wheel of torch
# (scripts/test_gpu_stack.sh runs their tests).
CI_SKIPS = (re.compile(re.escape(NO_GPU)),
            re.compile(r"could not import '(timm|torchvision\.models)'"))
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("CI") == "true":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(p.search(reason) for p in CI_SKIPS):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("skips CI does not allow (tests/conftest.py: CI_SKIPS)")
        for line in _unexpected_skips:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test's torch.compile starts from empty caches (tests that count graphs or
    recompiles rely on it, and reset nothing themselves): the code Dynamo keeps for
    ``MSLoRA.forward`` (one entry per options, layout, dtype and backend compiled) outlives the
    modules, and the ninth compile of it in one process is a hard error under fullgraph=True
    (the recompile limit, 8), which a one-worker run of the GPU tests reaches."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _triton_memcheck():
    """Under the interpreter, every Triton launch of every test is memchecked
    (tests/triton_memcheck.py): no lane may load, store or add outside its tensor arguments."""
    if not INTERPRET or importlib.util.find_spec("triton") is None:
        yield
        return
    from triton_memcheck import triton_memcheck

    with triton_memcheck():
        yield


@pytest.fixture
def no_tf32():
    """Turn TF32 off for the test (SPEC's 1e-4 float32 rule)."""
    from mslora_kernels import testing  # here: the package loads after TRITON_INTERPRET is set

    with testing.no_tf32():
        yield
