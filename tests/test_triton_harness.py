"""The Triton harness: the first kernel (GELU) under the interpreter and on the GPU, and the
compile check for sm_90/sm_80, which must also fail on a broken kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mslora_kernels.testing import check_close  # noqa: E402


def _gelu_check(device, dtype):
    from mslora_kernels.triton.gelu import gelu_fwd

    x = torch.randn(3, 1000 + 37, device=device, dtype=dtype) * 3  # not a multiple of BLOCK
    y = gelu_fwd(x)
    ref64 = F.gelu(x.double())
    check_close("gelu", y, ref64, dtype, baseline=F.gelu(x))
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gelu_interpreter(dtype):
    _gelu_check("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gelu_gpu(dtype):
    _gelu_check("cuda", dtype)


def _run_check(*args, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path is not None:
        paths = (str(extra_path), env.get("PYTHONPATH"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return subprocess.run([sys.executable, "-m", "mslora_kernels.checks.triton_compile", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_compile_check_builds_gelu_for_both_archs():
    r = _run_check("--filter", "gelu")
    assert r.returncode == 0, r.stdout + r.stderr
    for dt in ("fp32", "fp16", "bf16"):
        for arch in ("sm90", "sm80"):
            assert any(f"gelu[{dt}" in line and arch in line for line in r.stdout.splitlines())
    assert "0 failed" in r.stdout


def test_compile_check_reports_why_ptxas_failed():
    """A PTX ptxas refuses (here: a PTX version no ptxas knows; Triton 3.9's bundled ``ptxas``
    refused its own sm_90 PTX so) fails with ptxas's own reason, not just its exit status. In a
    subprocess: the check's module drops TRITON_INTERPRET from the environment on import."""
    code = textwrap.dedent('''
        from mslora_kernels.checks.triton_compile import ptxas_path, ptxas_report
        for arch in (90, 80):
            print(arch, ptxas_path(arch))
        try:
            ptxas_report(".version 99.9\\n.target sm_90a\\n.address_size 64\\n", 90)
        except RuntimeError as e:
            print("refused:", e)
    ''')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for line in lines[:2]:
        assert os.access(line.split(" ", 1)[1], os.X_OK), line  # Triton's own ptxas, per arch
    assert lines[2].startswith("refused: ") and "exited" in lines[2], r.stdout
    assert "fatal" in lines[2] and "99.9" in lines[2], r.stdout



def test_compile_check_as_inductor_keeps_only_warps_and_stages():
    """``--as-inductor`` compiles a case with the launch options Inductor keeps under
    torch.compile: an fp32 backward case loses its register cap and the pinned FP fusion, which
    the plain check passes. (``triton.compile`` is recorded, not run; in a subprocess, as
    above.) End to end, the flag compiles the GELU cases."""
    code = textwrap.dedent('''
        import json
        from mslora_kernels.checks import triton_compile as tc
        from mslora_kernels.triton import mslora_bwd
        seen = []
        def record(src, target, options):
            seen.append(options)
            raise RuntimeError("recorded")
        tc.triton.compile = record
        case = next(c for c in mslora_bwd.compile_cases()
                    if c.maxnreg is not None and c.name.startswith("mslora_bwd_main[fp32"))
        for as_inductor in (False, True):
            r = tc.compile_one(("mslora_kernels.triton.mslora_bwd", case.name, 90, as_inductor))
            assert not r.ok and "recorded" in r.error, r
        print(json.dumps([case.num_warps, case.num_stages, case.maxnreg, seen]))
    ''')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    warps, stages, maxnreg, (plain, inductor) = json.loads(r.stdout.splitlines()[-1])
    assert plain == {"num_warps": warps, "num_stages": stages, "maxnreg": maxnreg,
                     "enable_fp_fusion": True}
    assert inductor == {"num_warps": warps, "num_stages": stages}
    r = _run_check("--as-inductor", "--filter", "gelu[fp32", "--arch", "90")
    assert r.returncode == 0 and "1 compiled, 0 failed" in r.stdout, r.stdout + r.stderr


BROKEN = textwrap.dedent('''
    import triton
    import triton.language as tl
    from mslora_kernels.triton._compile import CompileCase

    @triton.jit
    def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + tl.zeros((BLOCK, 2), tl.float32))

    def compile_cases():
        return [CompileCase("broken", _broken_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"},
                            {"BLOCK": 128})]
''')


def test_compile_check_fails_on_a_broken_kernel(tmp_path):
    (tmp_path / "broken_kernel_mod.py").write_text(BROKEN)
    r = _run_check("--only-module", "--module", "broken_kernel_mod", "--arch", "90",
                   extra_path=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "broken" in r.stdout and "ERROR" in r.stdout and "1 failed" in r.stdout


def test_compile_check_refuses_two_cases_of_one_name(tmp_path):
    """A worker finds its case again by name, so a second case of the same name (another
    configuration, or the same one listed twice) would be compiled as the first: refused. (In a
    subprocess: the check's module drops TRITON_INTERPRET from the environment on import.)"""
    from mslora_kernels.triton import mslora_bwd

    twice = BROKEN.replace('return [CompileCase("broken"', 'return 2 * [CompileCase("broken"')
    (tmp_path / "twice_mod.py").write_text(twice)
    r = _run_check("--only-module", "--module", "twice_mod", "--arch", "90",
                   extra_path=tmp_path)
    assert r.returncode != 0
    assert "twice_mod.compile_cases() names several cases ['broken']" in r.stderr, r.stderr
    names = [c.name for c in mslora_bwd.compile_cases()]
    assert len(names) == len(set(names)) and "mslora_bwd_pool[D=128]" in names


def test_compile_case_signature_follows_the_kernels_argument_order():
    """Triton 3.3's ASTSource reads the signature by position, 3.6's by name: a case written in
    another order (as mslora_bwd's dc_ptr and zmean_ptr once were) gave 3.3 the wrong types, so
    a case keeps the kernel's order, and refuses a signature that names other arguments."""
    import triton
    import triton.language as tl

    from mslora_kernels.triton._compile import CompileCase

    @triton.jit
    def kernel(a_ptr, b_ptr, n, BLOCK: tl.constexpr):
        pass

    case = CompileCase("k", kernel, {"b_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr",
                                     "a_ptr": "*fp32"}, {"BLOCK": 64})
    assert list(case.signature.items()) == [("a_ptr", "*fp32"), ("b_ptr", "*fp16"), ("n", "i32"),
                                            ("BLOCK", "constexpr")]
    with pytest.raises(ValueError, match=r"missing \['n'\], unknown \['m'\]"):
        CompileCase("k", kernel, {"a_ptr": "*fp32", "b_ptr": "*fp16", "m": "i32",
                                  "BLOCK": "constexpr"})


# ---- the compile check covers what the launchers launch ------------------------------------
def _record_launches(monkeypatch, module) -> list:
    """(kernel, keyword arguments) of every launch the launcher ``module`` makes."""
    launches = []
    real = module.wrap_triton

    class _Recorded:
        def __init__(self, kernel):
            self.kernel, self.launcher = kernel, real(kernel)

        def __getitem__(self, grid):
            run = self.launcher[grid]

            def call(*args, **kw):
                launches.append((self.kernel, kw))
                return run(*args, **kw)
            return call

    monkeypatch.setattr(module, "wrap_triton", _Recorded)
    return launches


# Launch options and what a launch that leaves one out gets: Triton's defaults (4 warps, 3 stages,
# no register cap, FP fusion as the installed Triton's default says, None here).
LAUNCH_DEFAULTS = {"num_warps": 4, "num_stages": 3, "maxnreg": None, "enable_fp_fusion": None}


def _split(kw: dict) -> tuple[dict, dict]:
    """A launch's keyword arguments as (constexprs, launch options with defaults filled in)."""
    opts = {k: kw.get(k, d) for k, d in LAUNCH_DEFAULTS.items()}
    return {k: v for k, v in kw.items() if k not in LAUNCH_DEFAULTS}, opts


def _matches(case, kernel, kw) -> bool:
    """Is this launch ``case``: the same kernel, constexprs and launch options (the options the
    compile check passes ``triton.compile``)?"""
    cx, opts = _split(kw)
    case_opts = {k: case.options().get(k, d) for k, d in LAUNCH_DEFAULTS.items()}
    return case.fn is kernel and case.constexprs == cx and case_opts == opts


def _as_compiled(kernel, kw, cases) -> bool:
    """Is this launch one of ``cases``?"""
    return any(_matches(c, kernel, kw) for c in cases)


@pytest.mark.interpreter
@pytest.mark.parametrize("rank", [24, 128])
@pytest.mark.parametrize("opts", [{}, dict.fromkeys(
    ("prenorm", "enhance", "pool", "gate", "shuffle"), True)], ids=["plain", "all"])
def test_launches_are_configurations_the_compile_check_compiles(monkeypatch, opts, rank):
    """Every forward and backward launch at K=(3,5,7) and D=128 or D=24 (the compile check's K
    and ranks: its D=32 cases are those of every D from 17 to 32) is a configuration the check
    compiles, launch options included: what it reports (registers, spills, shared memory) is
    what runs. (A backward that left num_stages out ran Triton's default of 3 stages while the
    check compiled 2.)"""
    from mslora_kernels import MSLoRA
    from mslora_kernels.triton import mslora_bwd as bwd
    from mslora_kernels.triton import mslora_fwd as fwd
    from mslora_kernels.triton import taps

    m = MSLoRA(8, rank, 4, (3, 5, 7), **opts)
    weights = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(1, 8, 3, 5)
    launches = {mod: _record_launches(monkeypatch, mod) for mod in (fwd, bwd, taps)}
    out, zmean = fwd.mslora_fwd(x, weights, m.options)
    for det in (False, True):
        bwd.mslora_bwd(torch.randn_like(out), x, weights, m.options, zmean, deterministic=det)
    # F1, F2; per backward B0, B1, (pool,) B2, finish; the taps packed once per call
    per_bwd = 5 if opts else 4
    assert [len(launches[mod]) for mod in (fwd, bwd, taps)] == [2, 2 * per_bwd, 3]
    for mod, recorded in launches.items():
        cases = mod.compile_cases()
        for kernel, kw in recorded:
            assert _as_compiled(kernel, kw, cases), (kernel, kw)


def _specialize(arg) -> tuple:
    """(type, key) of ``arg`` as Triton's launcher specialises it for an aligned launch ("D" in
    the key: divisible by 16), through the API of the installed version: the native
    ``native_specialize_impl`` from 3.6, ``create_specialize_impl`` before (3.4-3.5 bind the
    backend's rule at creation, 3.3 takes it at each call)."""
    import inspect

    from triton.backends.compiler import BaseBackend

    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:
        from triton.runtime.jit import create_specialize_impl

        rule = BaseBackend.get_arg_specialization
        if inspect.signature(create_specialize_impl).parameters:
            return create_specialize_impl(rule)(arg, False, True, True)
        return create_specialize_impl()(arg, rule, False, True, True)
    return native_specialize_impl(BaseBackend, arg, False, True, True)


@pytest.mark.parametrize("data_format,memory_format", [
    ("channels_first", torch.contiguous_format), ("channels_first", torch.channels_last),
    ("channels_last", torch.contiguous_format)], ids=["nchw", "nchw_cl", "nhwc"])
def test_aligned_cases_are_specialised_as_the_default_rank_launches(monkeypatch, data_format,
                                                                    memory_format):
    """At D = 128, C = 64, G = 4 (the default rank, the narrowest usual width), every launch has
    a ",a16" compile case, and every argument that case compiles as 16-divisible is one Triton's
    launcher specialises so for that launch (``_specialize``: the launcher's own rule, on its
    own arguments): what the aligned cases report is what such launches run."""
    import inspect

    from mslora_kernels import MSLoRA
    from mslora_kernels.triton import mslora_bwd as bwd
    from mslora_kernels.triton import mslora_fwd as fwd

    launches = []

    class _Recorded:  # records each launch with its arguments, runs nothing
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.kernel, args, kw))

    for module in (fwd, bwd):
        monkeypatch.setattr(module, "wrap_triton", _Recorded)
    m = MSLoRA(64, 128, 4, (3, 5, 7), data_format=data_format, prenorm=True, enhance=True,
               pool=True, gate=True, shuffle=True)
    weights = {k: v.detach() for k, v in m.named_parameters()}
    shape = (2, 5, 7, 64) if data_format == "channels_last" else (2, 64, 5, 7)
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    out, _ = fwd.mslora_fwd(x, weights, m.options)
    zmean = torch.zeros(2, 128)
    for det in (False, True):
        bwd.mslora_bwd(torch.randn_like(out), x, weights, m.options, zmean, deterministic=det)
    cases = [c for c in fwd.compile_cases() + bwd.compile_cases() if c.name.endswith(",a16]")]
    # F1, F2 and per backward B0, B1, B2 (the small pool and finishing kernels have no rank-128
    # variant)
    launches = [rec for rec in launches if any(c.fn is rec[0] for c in cases)]
    assert len(launches) == 8
    for kernel, args, kw in launches:
        cx, _ = _split(kw)
        case = [c for c in cases if _matches(c, kernel, kw)]
        assert len(case) == 1, (kernel, kw)
        bound = inspect.signature(kernel.fn).bind(*args, **cx).arguments
        assert case[0].divisible_by_16
        for name in case[0].divisible_by_16:
            spec = _specialize(bound[name])
            assert spec[1] == "D", f"{case[0].name}: {name} is specialised as {spec}"


@pytest.mark.interpreter
def test_every_launch_pins_fp_fusion():
    """Every Triton launch of the package asks for FP fusion (FMA contraction) itself, so that
    every Triton version compiles the kernels the same: 3.10 turns its default off, and 3.9
    warns about that at a process's first compile. Recorded where every interpreted launch
    goes: the MSLoRA forward and both backwards with every option, the fused LoRA linear's
    forward and input gradient, and GELU."""
    from launches import interpreted_launches

    from mslora_kernels import MSLoRA
    from mslora_kernels.lora_ops import lora_linear
    from mslora_kernels.triton._compile import FP_FUSION
    from mslora_kernels.triton.gelu import gelu_fwd

    seen = []
    m = MSLoRA(8, 4, 2, (3, 5), prenorm=True, enhance=True, pool=True, gate=True, shuffle=True,
               backend="triton")
    x = torch.randn(1, 8, 3, 5, requires_grad=True)
    x2 = torch.randn(3, 6, requires_grad=True)
    w, a, v = torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    with interpreted_launches(lambda name, kw: seen.append((name, kw.get("enable_fp_fusion")))):
        for det in (False, True):
            m.deterministic = det
            m(x).sum().backward()
        lora_linear(x2, w, torch.randn(5), a, v).sum().backward()
        gelu_fwd(torch.randn(7))

    assert {name for name, _ in seen} == {
        "_pack_taps_kernel", "_mslora_f1_kernel", "_mslora_f2_kernel", "_bwd_z_kernel",
        "_bwd_main_kernel", "_bwd_pool_kernel", "_bwd_dz_kernel", "_bwd_finish_kernel",
        "_lora_linear_kernel", "_gelu_kernel"}
    assert FP_FUSION is True
    assert [rec for rec in seen if rec[1] is not FP_FUSION] == []
