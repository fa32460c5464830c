"""The fused LoRA-family kernel and op: interpreter (CPU: the op in fp32, the modules in every
dtype) and GPU (bf16/fp16/fp32) checks.

Expected values are SPEC's equations in float64 (``serial_lora_reference`` /
``msplora_reference`` and the plain ``x W^T + b + (x A^T) V^T``); tolerances are
``mslora_kernels.testing``'s rule.
"""

from __future__ import annotations

import pytest
import torch

from mslora_kernels.lora import LoRAPair, MSPLoRALinear, SerialLoRALinear
from mslora_kernels.testing import check_close, rel_error

M_TOK, K, N, R = 2 * 37, 40, 120, 3  # odd sizes: 2 images x 37 tokens, d = 40, qkv = 3d, r = 3


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _plain(x, w, b, a, v):
    y = x @ w.T + (x @ a.T) @ v.T
    return y if b is None else y + b


def _inputs(m, k, n, r, dtype, device, bias=True):
    x = torch.randn(m, k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, dtype=torch.float64) if bias else None
    a = torch.randn(r, k, dtype=torch.float64) / k ** 0.5
    v = torch.randn(n, r, dtype=torch.float64)
    return [None if t is None else t.to(device, dtype) for t in (x, w, b, a, v)]


def _grads(fn, ts, g):
    ts = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
    y = fn(*ts)
    gs = torch.autograd.grad(y, [t for t in ts if t is not None], g.to(y.dtype))
    return y, gs


def _op(x, w, b, a, v):
    from mslora_kernels.lora_ops import lora_linear
    return lora_linear(x, w, b, a, v)


@pytest.mark.interpreter
@pytest.mark.parametrize("m, k, n, r, bias", [
    (M_TOK, K, N, R, True), (M_TOK, K, N, R, False), (37, K, 3 * K, 14, True),
    (5, 24, 72, 64, True), (130, 24, 136, 17, True),
])
def test_op_fp32_interpreter(m, k, n, r, bias):
    """Output and the gradients of x, W, bias, A and V against float64 (1e-4, TF32 off)."""
    ins = _inputs(m, k, n, r, torch.float32, "cpu", bias)
    ref_ins = [None if t is None else t.double() for t in ins]
    g = torch.randn(m, n, dtype=torch.float64)
    y, gs = _grads(_op, ins, g)
    y_ref, gs_ref = _grads(_plain, ref_ins, g)
    check_close("y", y, y_ref, torch.float32)
    for i, (u, e) in enumerate(zip(gs, gs_ref, strict=True)):
        check_close(f"grad {i}", u, e, torch.float32)


@pytest.mark.interpreter
def test_op_leading_dims_and_empty():
    from mslora_kernels.lora_ops import lora_linear
    x, w, b, a, v = _inputs(M_TOK, K, N, R, torch.float32, "cpu")
    y = lora_linear(x.reshape(2, 37, K), w, b, a, v)
    assert y.shape == (2, 37, N)
    assert rel_error(y.reshape(M_TOK, N), _plain(x, w, b, a, v)) < 1e-5
    assert lora_linear(x[:0], w, b, a, v).shape == (0, N)


@pytest.mark.interpreter
def test_op_noncontiguous_operands():
    """Operands in transposed memory give bitwise the output and gradients of contiguous ones."""
    ins = _inputs(M_TOK, K, N, R, torch.float32, "cpu")
    strided = [t.t().contiguous().t() if t.dim() == 2 else t for t in ins]
    assert not any(t.is_contiguous() for t in strided if t.dim() == 2)
    g = torch.randn(M_TOK, N)
    y, gs = _grads(_op, ins, g)
    y_nc, gs_nc = _grads(_op, strided, g)
    assert torch.equal(y_nc, y)
    for u, e in zip(gs_nc, gs, strict=True):
        assert torch.equal(u, e)


@pytest.mark.interpreter
def test_op_inference_mode():
    """Under torch.inference_mode the op gives bitwise what it gives under no_grad."""
    ins = _inputs(M_TOK, K, N, R, torch.float32, "cpu")
    with torch.no_grad():
        want = _op(*ins)
    with torch.inference_mode():
        got = _op(*ins)
    assert got.is_inference() and torch.equal(got, want)


@pytest.mark.interpreter
def test_op_validation_before_launch():
    from mslora_kernels.lora_ops import lora_linear
    x, w, b, a, v = _inputs(M_TOK, K, N, R, torch.float32, "cpu")
    with pytest.raises(TypeError, match="dtype"):
        lora_linear(x.double(), w, b, a, v)
    with pytest.raises(TypeError, match="a has dtype"):
        lora_linear(x, w, b, a.half(), v)
    with pytest.raises(ValueError, match="features"):
        lora_linear(x[:, :-1], w, b, a, v)
    with pytest.raises(ValueError, match="v has shape"):
        lora_linear(x, w, b, a, v[:, :-1])
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, w, b[:-1], a, v)
    a65, v65 = torch.randn(65, K), torch.randn(N, 65)
    with pytest.raises(ValueError, match="at most 64"):
        lora_linear(x, w, b, a65, v65)


def _serial(d, r, dtype, device):
    base = torch.nn.Linear(d, 3 * d).to(device, dtype).requires_grad_(False)
    pair = LoRAPair(d, d, r).to(device, dtype)
    with torch.no_grad():
        pair.B.normal_(0, 0.3)
    return base, pair


def _msp(d, ranks, dtype, device):
    base = torch.nn.Linear(d, 3 * d).to(device, dtype).requires_grad_(False)
    levels = []
    for name, r in zip(("msp_global", "msp_mid", "msp_layer"), ranks, strict=True):
        p = LoRAPair(d, 3 * d, r).to(device, dtype)
        with torch.no_grad():
            p.B.normal_(0, 0.3)
        levels.append((name, p, 16.0 / r, True))
    return base, levels


def _module_check(make_fused, make_ref, params_of, x, dtype, tf32=False):
    """The fused module vs the reference module (same parameters), float64 as the truth."""
    fused, ref64 = make_fused(), make_ref(torch.float64)
    g = torch.randn(*x.shape[:-1], fused.out_features, dtype=torch.float64, device=x.device)
    xs = x.detach().clone().requires_grad_()
    y = fused(xs)
    gs = torch.autograd.grad(y, [xs] + params_of(fused), g.to(y.dtype))
    x64 = x.detach().double().requires_grad_()
    y64 = ref64(x64)
    gs64 = torch.autograd.grad(y64, [x64] + params_of(ref64), g)
    base = None
    if dtype in (torch.float16, torch.bfloat16):
        refd = make_ref(dtype)
        xd = x.detach().clone().requires_grad_()
        yd = refd(xd)
        base = (yd, torch.autograd.grad(yd, [xd] + params_of(refd), g.to(dtype)))
    check_close("out", y, y64, dtype, baseline=None if base is None else base[0], tf32=tf32)
    for i, (u, e) in enumerate(zip(gs, gs64, strict=True)):
        check_close(f"grad {i}", u, e, dtype, baseline=None if base is None else base[1][i],
                    tf32=tf32)


def _serial_modules(d, r, dtype, device):
    base, pair = _serial(d, r, dtype, device)

    def make(backend, dt):
        import copy
        return SerialLoRALinear(copy.deepcopy(base).to(dt), copy.deepcopy(pair).to(dt),
                                scale=8 / r, backend=backend)
    return make, lambda m: [m.pair.A, m.pair.B]


def _msp_modules(d, ranks, dtype, device):
    base, levels = _msp(d, ranks, dtype, device)

    def make(backend, dt):
        import copy
        lv = [(n, copy.deepcopy(p).to(dt), s, True) for n, p, s, _ in levels]
        return MSPLoRALinear(copy.deepcopy(base).to(dt), lv, backend=backend)
    return make, lambda m: [t for p in m.pairs() for t in (p.A, p.B)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["serial", "msplora"])
def test_modules_triton_interpreter(kind, dtype):
    make, params_of = (_serial_modules(K, R, dtype, "cpu") if kind == "serial"
                       else _msp_modules(K, (4, 3, 2), dtype, "cpu"))
    x = torch.randn(2, 37, K, dtype=dtype)
    _module_check(lambda: make("triton", dtype), lambda dt: make("reference", dt), params_of, x,
                  dtype)


def _check_func_transforms(device):
    """torch.func.grad over Serial LoRA and MSPLoRA: "auto" gives autograd's gradients (the
    reference, which it picks inside a transform); "triton" named explicitly is refused there
    with an error that says why (mslora_kernels.backends)."""
    from torch.func import functional_call, grad

    x = torch.randn(2, 37, K, device=device)
    for make, _ in (_serial_modules(K, R, torch.float32, device),
                    _msp_modules(K, (4, 3, 2), torch.float32, device)):
        m = make("auto", torch.float32)
        params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}

        def loss(p, m=m):
            return functional_call(m, p, (x,)).square().sum()

        m(x).square().sum().backward()  # on a GPU through the fused kernel: across backends
        got = grad(loss)(params)
        for n, p in m.named_parameters():
            if p.requires_grad:
                assert rel_error(got[n], p.grad) < 1e-5, n
        m.backend = "triton"
        with pytest.raises(RuntimeError, match="LoRA backend='triton' cannot run inside a "
                           "torch.func transform"):
            grad(loss)(params)


@pytest.mark.interpreter
def test_func_transforms_interpreter():
    _check_func_transforms("cpu")


@pytest.mark.gpu
def test_func_transforms_gpu(no_tf32):
    _check_func_transforms("cuda")


def test_compile_cases_cover_every_launcher_choice():
    from mslora_kernels.triton import lora_linear as L
    names = [c.name for c in L.compile_cases()]
    assert len(names) == len(set(names))
    for (dt, prec) in L.TILES:
        for br in L.BLOCK_RS:
            for call in ("fwd", "bwd"):
                assert any(n.startswith(f"lora_linear[{call},{dt},{prec},R<={br},") for n in names)


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["serial", "msplora"])
@pytest.mark.parametrize("d, tokens", [(40, 37), (768, 197)])
def test_modules_triton_gpu(dtype, kind, d, tokens, no_tf32):
    make, params_of = (_serial_modules(d, 8, dtype, "cuda") if kind == "serial"
                       else _msp_modules(d, (8, 4, 2), dtype, "cuda"))
    x = torch.randn(4, tokens, d, device="cuda", dtype=dtype)
    _module_check(lambda: make("triton", dtype), lambda dt: make("reference", dt), params_of, x,
                  dtype)


@pytest.mark.gpu
def test_op_fp32_tf32_gpu():
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ins = _inputs(4 * 197, 768, 2304, 8, torch.float32, "cuda")
        y = _op(*ins)
        check_close("y", y, _plain(*[t.double() for t in ins]), torch.float32, tf32=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck_gpu(dtype):
    from torch.library import opcheck

    import mslora_kernels.lora_ops  # noqa: F401 (registers torch.ops.mslora.lora_linear*)
    x, w, b, a, v = _inputs(M_TOK, K, N, R, dtype, "cuda")
    for t in (x, a, v):
        t.requires_grad_()
    opcheck(torch.ops.mslora.lora_linear.default, (x, w, b, a, v, False))
    opcheck(torch.ops.mslora.lora_linear.default, (x, w, None, a, v, False))
    g = torch.randn(M_TOK, N, device="cuda", dtype=dtype)
    # The backward op has no autograd of its own: inputs that require grad would make opcheck's
    # aot_dispatch checks differentiate through it.
    opcheck(torch.ops.mslora.lora_linear_bwd_dx.default, (g, w, a.detach(), v.detach(), False))


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu():
    make, params_of = _serial_modules(64, 8, torch.bfloat16, "cuda")
    mod = make("triton", torch.bfloat16)
    x = torch.randn(2, 49, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True)
    y, y_eager = compiled(x), mod(x)
    assert rel_error(y, y_eager) < 1e-2
    y.float().sum().backward()
    assert all(p.grad is not None for p in params_of(mod))
