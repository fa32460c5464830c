"""The MSLoRA module: parameter names, shapes and init (the checkpoint format), counts, refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mslora_kernels import MSLoRA, available_backends, mslora_param_count
from mslora_kernels.config import weight_shapes
from mslora_kernels.testing import rel_error

ALL_OPTS = dict(prenorm=True, enhance=True, pool=True, gate=True, shuffle=True)


def test_parameter_names_and_shapes_follow_spec():
    c, d, g = 40, 24, 4
    m = MSLoRA(c, d, g, (3, 5, 7), **ALL_OPTS)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "proj.weight": (d, c // g, 1, 1), "down.weight": (d, c // g, 1, 1),
        "dw.0.weight": (d, 1, 3, 3), "dw.1.weight": (d, 1, 5, 5), "dw.2.weight": (d, 1, 7, 7),
        "pw.weight": (d, d, 1, 1), "up.weight": (c, d // g, 1, 1),
        "norm.weight": (c,), "norm.bias": (c,), "enorm.weight": (d,), "enorm.bias": (d,),
        "gate.weight": (3, d, 1, 1), "gate.bias": (3,),
    }
    assert list(m.state_dict()) == list(shapes)  # no buffers: the state dict is the checkpoint
    assert weight_shapes(m.options) == shapes  # the table the fused launchers check against


def test_options_off_have_no_extra_parameters():
    names = {n for n, _ in MSLoRA(8, 8, 2).named_parameters()}
    assert names == {"proj.weight", "down.weight", "dw.0.weight", "dw.1.weight", "dw.2.weight",
                     "pw.weight", "up.weight"}


def test_initialisation_follows_spec():
    c, d, g = 64, 128, 4
    m = MSLoRA(c, d, g, **ALL_OPTS)
    assert torch.count_nonzero(m.up.weight) == 0  # a new adapter is the identity
    # Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for name, fan_in in [("proj", c // g), ("down", c // g), ("pw", d)]:
        w = getattr(m, name).weight
        bound = 1 / math.sqrt(fan_in)
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and w.std() > 0.4 * bound
    for i, k in enumerate((3, 5, 7)):
        w = m.dw[i].weight
        assert w.abs().max() <= 1 / k and w.abs().max() > 0.9 / k
    for name in ("weight", "bias"):
        p = getattr(m.gate, name)
        assert p.abs().max() <= 1 / math.sqrt(d) and p.abs().max() > 0.5 / math.sqrt(d)
    assert torch.equal(m.norm.weight, torch.ones(c)) and torch.equal(m.norm.bias, torch.zeros(c))
    assert torch.equal(m.enorm.weight, torch.ones(d))
    assert torch.equal(m.enorm.bias, torch.zeros(d))
    x = torch.randn(2, c, 5, 6)
    assert torch.equal(m(x), x)


def test_state_dict_round_trip_across_layouts():
    a = MSLoRA(16, 8, 2, gate=True)
    torch.nn.init.normal_(a.up.weight)
    b = MSLoRA(16, 8, 2, gate=True, data_format="channels_last")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(b(x.permute(0, 2, 3, 1)), a(x).permute(0, 2, 3, 1))


def test_param_count_is_eq3():
    assert mslora_param_count(64) == 3 * 64 * 128 // 4 + 128 * 128 + 83 * 128
    m = MSLoRA(40, 24, 4, (3, 5))
    assert mslora_param_count(40, 24, 4, (3, 5)) == sum(p.numel() for p in m.parameters())


RESNET50 = {64: 3, 128: 4, 256: 6, 512: 3}   # inner width: bottleneck blocks
SWIN_B = {128: 2, 256: 2, 512: 18, 1024: 2}   # C: blocks
SWIN_L = {192: 2, 384: 2, 768: 18, 1536: 2}


def total(widths, **kw):
    return sum(n * mslora_param_count(c, **kw) for c, n in widths.items())


def test_paper_totals():
    # SPEC section 1 "Placement": the paper's figures, in millions, rounded to two decimals.
    assert round(total(RESNET50) / 1e6, 2) == 0.79
    assert round(total(SWIN_B) / 1e6, 2) == 1.80
    assert round(total(SWIN_B, groups=1) / 1e6, 2) == 5.27
    assert round(total(SWIN_B, groups=2) / 1e6, 2) == 2.96
    assert round(total(SWIN_B, groups=8) / 1e6, 2) == 1.23
    assert round(total(SWIN_L) / 1e6, 2) == 2.38
    # Table 1 (G=1): projections (proj, down, up) and the nonlinear branches separately.
    proj = lambda widths: sum(n * 3 * c * 128 for c, n in widths.items())
    assert round(proj(RESNET50) / 1e6, 2) == 1.45
    assert round(sum(RESNET50.values()) * (128 * 128 + 83 * 128) / 1e6, 2) == 0.43
    assert round(proj(SWIN_L) / 1e6, 2) == 6.93


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=10, groups=4), r"C % G"),
    (dict(channels=8, rank=6, groups=4), r"D % G"),
    (dict(channels=8, kernel_sizes=(3, 4)), r"kernel size 4 is even"),
    (dict(channels=8, kernel_sizes=(0,)), r"kernel size 0 must be positive"),
    (dict(channels=8, kernel_sizes=(-3,)), r"kernel size -3 must be positive"),
    (dict(channels=8, kernel_sizes=()), r"at least one kernel size"),
    (dict(channels=8, data_format="NHWC"), r"unknown data_format 'NHWC'"),
    (dict(channels=8, backend="tpu"), r"unknown backend 'tpu'"),
    (dict(channels=0), r"channels must be a positive integer"),
])
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MSLoRA(**{"rank": 8, **kwargs})


@pytest.mark.parametrize("fmt, x, exc, message", [
    ("channels_first", torch.randn(8, 5, 5), ValueError, r"must be 4-D \(N, C, H, W\).*3-D"),
    ("channels_first", torch.randn(1, 1, 8, 5, 5), ValueError, r"5-D"),
    ("channels_first", torch.randn(1, 6, 5, 5), ValueError, r"6 channels.*built for 8"),
    ("channels_last", torch.randn(1, 8, 5, 5), ValueError, r"5 channels.*\(N, H, W, C\)"),
    ("channels_first", torch.ones(1, 8, 5, 5, dtype=torch.int64), TypeError, r"floating-point"),
    ("channels_first", torch.randn(2, 8, 0, 5), ValueError, r"empty feature map \(H=0, W=5\)"),
    ("channels_last", torch.randn(2, 5, 0, 8), ValueError, r"empty feature map \(H=5, W=0\)"),
])
def test_bad_input_is_refused(fmt, x, exc, message):
    m = MSLoRA(8, 8, 2, data_format=fmt)
    with pytest.raises(exc, match=message):
        m(x)


def _need_gpu_backend(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"the {backend} backend cannot run on this GPU machine")


def _empty_batch_cases(backends):
    return [(b, dt, fmt, mem) for b in backends
            for dt in (torch.float32, torch.float16, torch.bfloat16)
            for fmt, mem in (("channels_first", None), ("channels_first", torch.channels_last),
                             ("channels_last", None))]


def _check_empty_batch(backend, dtype, fmt, mem, device):
    """N = 0, as PyTorch's own layers take it: an empty output of x's shape and dtype, an empty
    dx, and every weight's gradient zero."""
    m = MSLoRA(12, 8, 2, kernel_sizes=(3, 5), data_format=fmt, backend=backend, **ALL_OPTS)
    m = m.to(device)
    shape = (0, 12, 5, 7) if fmt == "channels_first" else (0, 5, 7, 12)
    x = torch.randn(shape, device=device, dtype=dtype)
    if mem is not None:
        x = x.contiguous(memory_format=mem)
    x.requires_grad_(True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("backend, dtype, fmt, mem", _empty_batch_cases(available_backends("cpu")),
                         ids=str)
def test_empty_batch_cpu(backend, dtype, fmt, mem):
    _check_empty_batch(backend, dtype, fmt, mem, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend, dtype, fmt, mem",
                         _empty_batch_cases(("reference", "triton", "cuda")), ids=str)
def test_empty_batch_gpu(backend, dtype, fmt, mem):
    _need_gpu_backend(backend)
    _check_empty_batch(backend, dtype, fmt, mem, "cuda")


def _adapter(backend, device):
    """A small MSLoRA with every option, seeded, its up-projection non-zero."""
    torch.manual_seed(0)
    m = MSLoRA(12, 8, 2, kernel_sizes=(3, 5), backend=backend, **ALL_OPTS).to(device)
    torch.nn.init.normal_(m.up.weight, 0, 0.2)
    return m


def _check_inference_mode(backend, device):
    """Under torch.inference_mode the module gives what it gives under no_grad, as an
    inference tensor; an inference tensor fed to it with grad on gets torch's own error (it
    cannot be saved for backward), not a failure inside a kernel."""
    m = _adapter(backend, device)
    x = torch.randn(2, 12, 5, 7, device=device)
    with torch.no_grad():
        want = m(x)
    with torch.inference_mode():
        got = m(x)
        x_inference = x.clone()
    assert got.is_inference()
    # the same kernels: bitwise on the CPU; on the GPU as close as any two runs of them
    assert torch.equal(got, want) if device == "cpu" else rel_error(got, want) < 1e-6
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        m(x_inference)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_inference_mode_cpu(backend):
    _check_inference_mode(backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_inference_mode_gpu(backend):
    _need_gpu_backend(backend)
    _check_inference_mode(backend, "cuda")


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` in a non-contiguous tensor: the last two dims' (or a 1-D tensor's
    every other element's) storage order swapped."""
    if t.dim() == 1:
        out = torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)[::2]
        return out.copy_(t)
    if t.shape[-1] == 1 and t.shape[-2] == 1:  # (O, I, 1, 1): swap O and I in memory
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _check_noncontiguous_weights(backend, device):
    """Weights in non-contiguous memory (a parameter set from a transposed or strided view)
    give the same output and gradients as the same values in contiguous memory: the kernels
    index weights as row-major, so each launcher has to make them so (the Triton backward once
    read them as they lay, and every gradient came out wrong)."""
    m = _adapter(backend, device)
    nc = copy.deepcopy(m)
    for name, p in list(nc.named_parameters()):
        owner, attr = name.rsplit(".", 1)
        setattr(nc.get_submodule(owner), attr, torch.nn.Parameter(_noncontiguous(p.detach())))
    strided = [n for n, p in nc.named_parameters() if not p.is_contiguous()]
    assert len(strided) == len(list(m.parameters())), strided
    x = torch.randn(2, 12, 5, 7, device=device)
    for mod in (m, nc):
        mod(x).square().sum().backward()

    def same(a, b):  # bitwise on the CPU; on the GPU weight-gradient atomics sum in any order
        return torch.equal(a, b) if device == "cpu" else rel_error(a, b) < 1e-5

    assert same(nc(x), m(x))
    for (name, a), b in zip(nc.named_parameters(), m.parameters(), strict=True):
        assert same(a.grad, b.grad), name


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_noncontiguous_weights_cpu(backend):
    _check_noncontiguous_weights(backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_noncontiguous_weights_gpu(backend, no_tf32):
    _need_gpu_backend(backend)
    _check_noncontiguous_weights(backend, "cuda")


def _check_func_transforms(device):
    """torch.func: grad of a functional_call and vmap over images give what autograd and the
    batched call give, through the reference, which "auto" picks inside a transform; a fused
    backend named explicitly is refused there with an error that says why and what to use,
    but runs where the transform does not reach the adapter's tensors."""
    from torch.func import functional_call, grad, vmap

    m = _adapter("auto", device)
    x = torch.randn(3, 12, 5, 7, device=device)
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss(p, x):
        return functional_call(m, p, (x,)).square().sum()

    # (on a GPU "auto" outside the transform is a fused backend: the comparisons cross backends)
    m(x).square().sum().backward()
    got = grad(loss)(params, x)
    for n, p in m.named_parameters():
        assert rel_error(got[n], p.grad) < 1e-5, n
    with torch.no_grad():
        want = m(x)
    # vmap over images: each call sees one image (pool's mean is per image, so it matches)
    assert rel_error(vmap(m)(x.unsqueeze(1)).squeeze(1), want) < 1e-5

    for backend in available_backends(device)[1:]:
        m.backend = backend
        with pytest.raises(RuntimeError, match=rf"backend='{backend}' cannot run inside a "
                           r"torch\.func transform.*use backend='reference'"):
            grad(loss)(params, x)
        with pytest.raises(RuntimeError, match="cannot run inside a torch.func transform"):
            vmap(m)(x.unsqueeze(1))
        w = torch.randn(12, device=device)
        g = grad(lambda w: (m(x).mean((0, 2, 3)) * w).sum())(w)  # the adapter's tensors plain
        assert rel_error(g, want.mean((0, 2, 3))) < 1e-5, backend


def test_func_transforms_cpu():
    _check_func_transforms("cpu")


@pytest.mark.gpu
def test_func_transforms_gpu(no_tf32):
    _check_func_transforms("cuda")


def test_device_mismatch_is_refused():
    m = MSLoRA(8, 8, 2).to("meta")
    with pytest.raises(ValueError, match=r"input is on cpu but the module's parameters are on met"):
        m(torch.randn(1, 8, 4, 4))


def test_backends_on_cpu_never_fall_back_silently(monkeypatch):
    x = torch.randn(1, 8, 4, 4)
    assert available_backends("cpu")[0] == "reference"
    with pytest.raises(RuntimeError, match=r"backend='cuda'.*(extension|CUDA tensor)"):
        MSLoRA(8, 8, 2, backend="cuda")(x)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton'.*TRITON_INTERPRET=1"):
        MSLoRA(8, 8, 2, backend="triton")(x)


def test_auto_is_the_reference_on_cpu():
    m = MSLoRA(8, 8, 2)
    torch.nn.init.normal_(m.up.weight)
    ref = MSLoRA(8, 8, 2, backend="reference")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(m(x), ref(x))


def test_compute_dtype_follows_input_and_autocast():
    m = MSLoRA(8, 8, 2)
    torch.nn.init.normal_(m.up.weight)
    x = torch.randn(2, 8, 5, 5)
    assert m(x.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), atol=0.1, rtol=0.05)
    y.float().sum().backward()
    assert m.pw.weight.grad is not None and m.pw.weight.grad.dtype == torch.float32


# Ten configurations, each a fresh Dynamo cache entry on MSLoRA.forward: more than the
# recompile limit (8) in one process, which conftest's _fresh_dynamo keeps apart per test (the GPU
# suite compiles the module in more configurations than that).
COMPILE_CONFIGS = [dict(prenorm=p, pool=q, data_format=f) for p in (False, True)
                   for q in (False, True) for f in ("channels_first", "channels_last")]
COMPILE_CONFIGS += [dict(gate=True), dict(enhance=True, shuffle=True)]


@pytest.mark.parametrize("kwargs", COMPILE_CONFIGS)
def test_compile_fullgraph_in_any_number_of_configurations(kwargs):
    m = MSLoRA(8, 4, 2, (3,), backend="reference", **kwargs)
    shape = (1, 8, 5, 3) if m.options.data_format == "channels_first" else (1, 5, 3, 8)
    x = torch.randn(shape)
    torch.testing.assert_close(torch.compile(m, backend="eager", fullgraph=True)(x), m(x))
