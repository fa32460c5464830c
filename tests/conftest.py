"""Seeding, device and marker logic shared by every test file.

On a machine without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set
here, before anything imports triton, unless the caller already chose.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    skip_interp = pytest.mark.skip(
        reason="Triton interpreter tests run only with TRITON_INTERPRET=1 (set on CPU machines)"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_tf32():
    """Turn TF32 off for the test (SPEC's 1e-4 float32 rule)."""
    from mslora_kernels import testing  # here: the package loads after TRITON_INTERPRET is set

    with testing.no_tf32():
        yield
