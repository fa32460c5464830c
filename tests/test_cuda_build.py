"""setup.py builds the CUDA extension where nvcc is found (no GPU needed), skips it in one line
otherwise, and the package imports and works without it."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_NVCC = shutil.which("nvcc") is not None or any(
    os.path.isfile(os.path.join(os.environ.get(v, ""), "bin", "nvcc"))
    for v in ("CUDA_HOME", "CUDA_PATH"))


def _build(tmp_path, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "MAX_JOBS": "2", **env}
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=e, capture_output=True, text=True, timeout=1800)


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed here")
def test_extension_builds_and_imports_without_gpu(tmp_path):
    # one arch keeps the CI build short; a cache of this test's own, empty to begin with
    env = {"MSLORA_CUDA_ARCHS": "80", "MSLORA_CUDA_BUILD_CACHE": str(tmp_path / "cache")}
    r = _build(tmp_path, **env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " -c " in r.stdout and "reusing" not in r.stdout  # compiled
    (so,) = glob.glob(str(tmp_path / "lib" / "mslora_kernels" / "_C*.so"))
    (entry,) = glob.glob(str(tmp_path / "cache" / "*.so"))
    assert Path(entry).read_bytes() == Path(so).read_bytes()

    # the same inputs again, as a second pip install builds them: copied from the cache
    again = _build(tmp_path / "again", **env)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"reusing the CUDA extension built from the same sources, flags and tools: {entry}" \
        in again.stdout and " -c " not in again.stdout
    (so2,) = glob.glob(str(tmp_path / "again" / "lib" / "mslora_kernels" / "_C*.so"))
    assert Path(so2).read_bytes() == Path(so).read_bytes()
    assert os.access(so2, os.X_OK)
    code = (
        "import importlib.util as u, sys\n"
        f"spec = u.spec_from_file_location('mslora_kernels._C', {so!r})\n"
        "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m.error_string(0) == 'no error', m.error_string(0)\n"
        "print(sorted(n for n in dir(m) if not n.startswith('_')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gelu" in r.stdout and "mslora_launch" in r.stdout and "mslora_smem_bytes" in r.stdout


def _setup_module() -> dict:
    """setup.py's functions, without running setup()."""
    import runpy
    from unittest import mock

    with mock.patch("setuptools.setup"):
        return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed here")
def test_build_cache_key_covers_every_input(tmp_path):
    """The cache is reused only for the same inputs: any byte of any file under csrc/ (a header
    included) or of setup.py, and any flag, gives another key; include folders, which name pip's
    temporary build environment, do not."""
    pytest.importorskip("pybind11")
    setup = _setup_module()
    root = tmp_path / "project"
    shutil.copytree(ROOT / "csrc", root / "csrc")
    shutil.copy(ROOT / "setup.py", root / "setup.py")
    nvcc = setup["find_nvcc"]()[0]
    flags = ["-O3", *setup["gencode_flags"]("80"), "-I/tmp/pip-build-env-abc/pybind11/include"]

    def key(flags=flags):
        return setup["cache_key"](nvcc, flags, root=str(root))

    base = key()
    assert key(flags[:-1] + ["-I/tmp/pip-build-env-xyz/pybind11/include"]) == base
    assert key(["-O2", *flags[1:]]) != base
    assert key(["-O3", *setup["gencode_flags"]("90"), flags[-1]]) != base
    for name in ("csrc/common.cuh", "csrc/mslora.cu", "setup.py"):
        path = root / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert key() != base, name
        path.write_bytes(original)
    (root / "csrc" / "new.cuh").write_text("// a new header\n")
    assert key() != base
    (root / "csrc" / "new.cuh").unlink()
    assert key() == base


def test_build_cache_keeps_the_newest_builds(tmp_path):
    setup = _setup_module()
    built = tmp_path / "built.so"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "other.so").write_bytes(b"not ours")
    for i in range(setup["CACHE_KEEP"] + 2):
        built.write_bytes(bytes([i]))
        setup["cache_store"](str(tmp_path / "cache" / f"ext-{i}.so"), str(built))
        os.utime(tmp_path / "cache" / f"ext-{i}.so", (i, i))  # mtimes in store order
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left == [f"ext-{i}.so" for i in range(2, setup["CACHE_KEEP"] + 2)] + ["other.so"]
    assert (tmp_path / "cache" / "ext-3.so").read_bytes() == bytes([3])


def test_build_cache_never_fails_a_build(tmp_path, capsys):
    """A cache that cannot be written (its folder path runs through a file), an entry that is
    not a file, or one that cannot be copied is said so and passed by: the build goes on,
    compiling."""
    setup = _setup_module()
    built = tmp_path / "built.so"
    built.write_bytes(b"module")
    (tmp_path / "file").write_bytes(b"")
    setup["cache_store"](str(tmp_path / "file" / "cache" / "ext-key.so"), str(built))
    assert "the build was not cached" in capsys.readouterr().err
    out = tmp_path / "out.so"
    assert not setup["cache_fetch"](str(tmp_path / "absent.so"), str(out))
    (tmp_path / "entry.so").mkdir()  # isfile() is False: a miss
    assert not setup["cache_fetch"](str(tmp_path / "entry.so"), str(out))
    setup["cache_store"](str(tmp_path / "cache" / "ext-key.so"), str(built))
    assert setup["cache_fetch"](str(tmp_path / "cache" / "ext-key.so"), str(out))
    assert out.read_bytes() == b"module" and os.access(out, os.X_OK)
    assert len(list(tmp_path.glob("*.tmp"))) == 0
    # an entry that cannot be copied where the module goes: said, and compiled instead
    assert not setup["cache_fetch"](str(tmp_path / "cache" / "ext-key.so"),
                                    str(tmp_path / "no-such-folder" / "out.so"))
    assert "cannot reuse" in capsys.readouterr().err


def test_skip_build_prints_one_line_and_builds_nothing(tmp_path):
    r = _build(tmp_path, MSLORA_SKIP_CUDA_BUILD="1")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "mslora-kernels" in ln]
    assert lines == ["mslora-kernels: building no CUDA extension: MSLORA_SKIP_CUDA_BUILD is set"]
    assert not glob.glob(str(tmp_path / "lib" / "**" / "_C*.so"), recursive=True)


def _run_ok(code: str, cwd: Path = ROOT) -> None:
    """Run ``code`` in a fresh Python from ``cwd`` (default: the checkout); it must print ok."""
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def _package_copy(tmp_path: Path, files: dict[str, bytes] | None = None) -> Path:
    """A copy of the package with no compiled extension, plus ``files``; returns its parent, from
    which ``import mslora_kernels`` finds the copy."""
    dst = tmp_path / "mslora_kernels"
    shutil.copytree(ROOT / "mslora_kernels", dst,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    for name, data in (files or {}).items():
        (dst / name).write_bytes(data)
    return tmp_path


def _reason_in_copy(tmp_path: Path) -> str:
    return (
        "import sys\n"
        "# an editable install's finder would hand the copy the checkout's _C\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "import torch, mslora_kernels\n"
        f"assert mslora_kernels.__file__.startswith({str(tmp_path)!r}), mslora_kernels.__file__\n"
        "from mslora_kernels.backends import cuda_extension, cuda_unavailable_reason\n"
        "assert cuda_extension() is None\n"
        "why = cuda_unavailable_reason(torch.device('cuda'))\n"
    )


def test_package_works_without_extension(tmp_path):
    """Never built (no nvcc, or MSLORA_SKIP_CUDA_BUILD): said so, and everything else works."""
    code = _reason_in_copy(_package_copy(tmp_path)) + (
        "assert 'which was not built' in why, why\n"
        "assert 'cuda' not in mslora_kernels.available_backends('cpu')\n"
        "m = mslora_kernels.MSLoRA(8, rank=4, groups=2)\n"
        "x = torch.randn(1, 8, 3, 3)\n"
        "assert torch.equal(m(x), x)  # up is zero-initialised: identity\n"
        "import mslora_kernels.cuda.gelu, mslora_kernels.cuda.mslora\n"
        "print('ok')\n"
    )
    _run_ok(code, cwd=tmp_path)


def test_an_extension_that_does_not_load_says_so(tmp_path):
    """A _C that was built but does not load (a bad symbol, a broken file) is not reported as
    "not built": the reason carries the loader's message."""
    from importlib.machinery import EXTENSION_SUFFIXES

    root = _package_copy(tmp_path, {"_C" + EXTENSION_SUFFIXES[0]: b"not an ELF file"})
    code = _reason_in_copy(root) + (
        "import importlib.machinery as m\n"
        "assert 'built but does not load' in why, why\n"
        "assert '_C' + m.EXTENSION_SUFFIXES[0] + ':' in why, why  # the loader's own words\n"
        "print('ok')\n"
    )
    _run_ok(code, cwd=root)


def test_an_extension_built_for_another_python_names_both(tmp_path):
    """setup.py builds _C for the Python that installs the package; another Python finds only a
    file with a foreign ABI tag, and is told which file it found and which it would load."""
    root = _package_copy(tmp_path, {"_C.cpython-39-x86_64-linux-gnu.so": b"\x7fELF"})
    code = _reason_in_copy(root) + (
        "assert 'built for another Python' in why, why\n"
        "assert '_C.cpython-39-x86_64-linux-gnu.so' in why, why\n"
        "import importlib.machinery as m\n"
        "assert '_C' + m.EXTENSION_SUFFIXES[0] in why and 'reinstall' in why, why\n"
        "print('ok')\n"
    )
    _run_ok(code, cwd=root)


def _compile_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mslora_kernels.checks.cuda_compile", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed here")
def test_cuda_compile_check_passes_on_csrc():
    r = _compile_check()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "mslora::gelu_kernel<float>" in r.stdout and "sm90" in r.stdout and "sm80" in r.stdout
    assert "0 failed" in r.stdout


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed here")
def test_cuda_compile_check_fails_on_broken_source(tmp_path):
    (tmp_path / "ok.cu").write_text(
        "__global__ void fine(float* y) { __shared__ float s[32]; s[threadIdx.x] = 1.f;"
        " __syncthreads(); y[threadIdx.x] = s[31 - threadIdx.x]; }\n")
    (tmp_path / "broken.cu").write_text(
        "__global__ void broken(float* y) { y[threadIdx.x] = undeclared_name; }\n")
    r = _compile_check("--source", str(tmp_path), "--arch", "80")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ERROR: broken.cu for sm80" in r.stdout and "undeclared_name" in r.stdout
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("fine("))
    assert " 128 " in row  # the static shared memory of the good kernel is reported


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed here")
def test_cuda_compile_check_fails_on_empty_source(tmp_path):
    r = _compile_check("--source", str(tmp_path))
    assert r.returncode == 1 and "no .cu or .cpp files" in r.stderr


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed here")
@pytest.mark.parametrize("arch", [80, 90])
def test_channel_products_use_tensor_cores(tmp_path, arch):
    """The fp16/bf16 instantiations of the kernels with channel products (prep, fwd, bwd_tile,
    bwd_dx) contain MMA instructions (csrc/tc.cuh's WMMA products), the fp32 ones and bwd_dz
    (depthwise only) none: the tensor-core paths are really built."""
    import re
    import sysconfig

    import pybind11

    ptx = tmp_path / "mslora.ptx"
    r = subprocess.run(
        ["nvcc", "-ptx", str(ROOT / "csrc" / "mslora.cu"), "-o", str(ptx), "-std=c++17", "-O3",
         f"-arch=sm_{arch}", f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}",
         f"-I{pybind11.get_include()}"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    mma: dict[str, int] = {}
    entry = None
    for line in ptx.read_text().splitlines():
        if m := re.match(r"\.visible \.entry (\S+)\(", line):
            entry = m.group(1)
            mma[entry] = 0
        elif entry and re.search(r"\b(wmma\.mma|mma\.sync)\b", line):
            mma[entry] += 1
    for kernel in ("prep", "fwd", "bwd_tile", "bwd_dz", "bwd_dx"):
        for dtype, lowp in (("If", False), ("I6__half", True), ("I13__nv_bfloat16", True)):
            for layout in ("Lb0", "Lb1"):
                (name,) = [k for k in mma if f"mslora_{kernel}_kernel{dtype}{layout}" in k]
                assert (mma[name] > 0) == (lowp and kernel != "bwd_dz"), (name, mma[name])
