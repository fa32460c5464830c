"""The op layer: fake impls on meta tensors and under FakeTensorMode, argument encoding, refusal.

Nothing here launches a kernel, so these tests run everywhere (no GPU, no interpreter needed).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mslora_kernels import MSLoRA, MSLoRAOptions, ops

OPTIONS = ("prenorm", "enhance", "pool", "gate", "shuffle")
LAYOUTS = [("channels_first", None), ("channels_first", torch.channels_last),
           ("channels_last", None)]
LAYOUT_IDS = ["nchw", "nchw_cl_memory", "nhwc"]


def _weights(o: MSLoRAOptions, device="meta", dtype=torch.float32):
    m = MSLoRA(o.channels, o.rank, o.groups, o.kernel_sizes, o.prenorm, o.enhance, o.pool,
               o.gate, o.shuffle, o.data_format)
    params = dict(m.named_parameters())
    return [torch.empty(params[n].shape, device=device, dtype=dtype)
            for n in ops.weight_names(o)]


def _input(o: MSLoRAOptions, mem, n=2, h=13, w=9, device="meta", dtype=torch.float32):
    c = o.channels
    shape = (n, c, h, w) if o.data_format == "channels_first" else (n, h, w, c)
    x = torch.empty(shape, device=device, dtype=dtype)
    return x.contiguous(memory_format=mem) if mem is not None else x


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt,mem", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("pool", [False, True])
def test_fake_impls_on_meta(backend, dtype, fmt, mem, pool):
    o = MSLoRAOptions(40, 24, 4, (3, 5, 7), prenorm=True, enhance=True, pool=pool, gate=True,
                      shuffle=True, data_format=fmt)
    fwd, bwd = ops._OPS[backend]
    x, ws = _input(o, mem, dtype=dtype), _weights(o, dtype=dtype)
    out, zmean = fwd(x, ws, *ops.op_args(o), False)
    assert out.shape == x.shape and out.dtype == dtype and out.stride() == x.stride()
    assert zmean.dtype == torch.float32
    assert zmean.shape == ((2, 24) if pool else (0,))
    grad_x, flat = bwd(torch.empty_like(x), x, ws, zmean, *ops.op_args(o), True)
    assert grad_x.shape == x.shape and grad_x.stride() == x.stride() and grad_x.dtype == dtype
    assert flat.shape == (sum(w.numel() for w in ws),) and flat.dtype == dtype
    for g, w in zip(ops.split_weight_grads(flat, ws), ws, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype


def test_fake_impl_under_fake_tensor_mode_normalises_odd_strides():
    o = MSLoRAOptions(8, 16, 2)
    with FakeTensorMode():
        x = torch.empty(2, 8, 9, 14)[:, :, :, ::2]  # not one of the three layouts
        out, zmean = torch.ops.mslora.triton_fwd(x, _weights(o, device="cpu"), *ops.op_args(o),
                                                 False)
        assert out.shape == x.shape and out.is_contiguous()
        assert zmean.numel() == 0


def test_weight_names_follow_the_options():
    o = MSLoRAOptions(8, 16, 2, (3, 5), prenorm=True, gate=True)
    assert ops.weight_names(o) == ["proj.weight", "down.weight", "dw.0.weight", "dw.1.weight",
                                   "pw.weight", "up.weight", "norm.weight", "norm.bias",
                                   "gate.weight", "gate.bias"]
    m = MSLoRA(8, 16, 2, (3, 5), prenorm=True, gate=True, enhance=True)
    assert set(ops.weight_names(m.options)) == {n for n, _ in m.named_parameters()}


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_op_args_round_trip(fmt):
    o = MSLoRAOptions(40, 24, 4, (3, 7), prenorm=True, pool=True, shuffle=True, data_format=fmt)
    x = _input(o, None)
    assert ops._options(x, _weights(o), *ops.op_args(o)) == o


def test_triton_backend_is_available():
    assert ops.mslora_unavailable_reason("triton") is None


def test_cuda_reason_names_what_is_missing():
    reason = ops.mslora_unavailable_reason("cuda")
    if reason is not None:
        assert "cuda" in reason and ("mslora_kernels" in reason)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_fused_refuses_unsupported_dtype(dtype):
    o = MSLoRAOptions(8, 16, 2)
    x = torch.zeros(1, 8, 3, 3, dtype=dtype)
    ws = dict(zip(ops.weight_names(o), _weights(o, device="cpu", dtype=torch.float32), strict=True))
    with pytest.raises(TypeError, match=str(dtype)):
        ops.mslora(x, ws, o, "triton")


def test_module_refuses_float64_on_triton():
    # On a GPU machine Triton runs on CUDA tensors only (no interpreter there): CPU tensors would
    # be refused for their device first.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = MSLoRA(8, 16, 2, backend="triton").to(device).double()
    with pytest.raises(TypeError, match="float64"):
        m(torch.randn(1, 8, 3, 3, dtype=torch.float64, device=device))


def test_fused_refuses_weight_dtype_mismatch():
    o = MSLoRAOptions(8, 16, 2)
    ws = dict(zip(ops.weight_names(o), _weights(o, device="cpu", dtype=torch.float16), strict=True))
    with pytest.raises(TypeError, match="proj.weight"):
        ops.mslora(torch.randn(1, 8, 3, 3), ws, o, "triton")


def test_fused_refuses_missing_weight():
    o = MSLoRAOptions(8, 16, 2, gate=True)
    ws = dict(zip(ops.weight_names(o), _weights(o, device="cpu"), strict=True))
    del ws["gate.bias"]
    with pytest.raises(ValueError, match="gate.bias"):
        ops.mslora(torch.randn(1, 8, 3, 3), ws, o, "triton")


def test_fused_refuses_too_many_kernel_sizes():
    o = MSLoRAOptions(8, 16, 2, (1, 3, 5, 7, 9))
    ws = dict(zip(ops.weight_names(o), _weights(o, device="cpu"), strict=True))
    with pytest.raises(ValueError, match="at most 4 kernel sizes"):
        ops.mslora(torch.randn(1, 8, 3, 3), ws, o, "triton")


def test_fused_refuses_unknown_backend():
    o = MSLoRAOptions(8, 16, 2)
    ws = dict(zip(ops.weight_names(o), _weights(o, device="cpu"), strict=True))
    with pytest.raises(ValueError, match="reference"):
        ops.mslora(torch.randn(1, 8, 3, 3), ws, o, "reference")


def test_module_deterministic_flag_reaches_the_op(monkeypatch):
    seen = []

    def fake_mslora(x, weights, o, backend, deterministic=False):
        seen.append((backend, deterministic))
        return x

    monkeypatch.setattr(ops, "mslora", fake_mslora)
    monkeypatch.setattr("mslora_kernels.modules.resolve_backend", lambda b, d, *a: "triton")
    x = torch.randn(1, 8, 3, 3)
    MSLoRA(8, 16, 2, backend="triton")(x)
    MSLoRA(8, 16, 2, backend="triton", deterministic=True)(x)
    torch.use_deterministic_algorithms(True)
    try:
        MSLoRA(8, 16, 2, backend="triton")(x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [("triton", False), ("triton", True), ("triton", True)]


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    from mslora_kernels.backends import resolve_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
