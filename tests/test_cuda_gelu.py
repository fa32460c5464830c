"""The trivial CUDA kernel (csrc/gelu.cu) through its launcher mslora_kernels.cuda.gelu."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mslora_kernels.backends import cuda_extension, cuda_unavailable_reason
from mslora_kernels.cuda.gelu import gelu_fwd

needs_ext = pytest.mark.skipif(cuda_extension() is None,
                               reason=str(cuda_unavailable_reason(torch.device("cuda"))))


def test_refuses_cpu_tensor():
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        gelu_fwd(torch.randn(8))


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gelu_matches_torch(dtype):
    x = (3 * torch.randn(3, 1001, 7, device="cuda")).to(dtype)  # odd size: tail handling
    y = gelu_fwd(x)
    expected = F.gelu(x.float()).to(dtype)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=1e-5 if dtype == torch.float32 else None,
                               atol=1e-6 if dtype == torch.float32 else None)


@pytest.mark.gpu
@needs_ext
def test_gelu_refuses_bad_input():
    with pytest.raises(TypeError, match="dtype"):
        gelu_fwd(torch.ones(4, device="cuda", dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        gelu_fwd(torch.randn(4, 6, device="cuda").t())
    assert gelu_fwd(torch.empty(0, device="cuda")).numel() == 0
