"""Build the optional CUDA extension ``mslora_kernels._C`` from every .cu/.cpp file under csrc/.

The extension is built only when ``nvcc`` is found (``$CUDA_HOME/bin``, ``$CUDA_PATH/bin`` or
PATH); otherwise setup.py prints one line saying why and builds nothing, and the package works
without it (reference and Triton backends). ``MSLORA_SKIP_CUDA_BUILD=1`` forces the skip.

No torch at build time: the kernels include no torch headers and the binding is plain pybind11
(raw device pointers as ints, sizes, and the CUDA stream as an int), so the build needs only
setuptools, wheel, pybind11 and nvcc. Every source is compiled by nvcc, in parallel (at most
``MAX_JOBS`` at a time), and linked with ``nvcc -shared --cudart static`` so that the module
imports on a machine with no GPU and no CUDA runtime library.

A finished build is kept in a content-addressed cache, ``build/nvcc-cache/`` by default: the
next install whose inputs are the same (every file under csrc/, setup.py, the nvcc flags and
version, pybind11's version, the Python ABI) copies it instead of compiling again, since pip's
editable install builds in a fresh temporary directory every time (about a minute of nvcc here).
Any change to those inputs misses the cache and builds; the newest few builds are kept.

Environment:
    MSLORA_SKIP_CUDA_BUILD=1   build no extension
    MSLORA_CUDA_BUILD_CACHE    the cache's folder (default build/nvcc-cache); 0 turns it off
    MSLORA_CUDA_ARCHS="80;90"  SM architectures to build SASS for (PTX of the highest is added)
    MAX_JOBS=N                 parallel nvcc processes (default: CPU count, at most 4)
    CUDA_HOME / CUDA_PATH      where to look for bin/nvcc before PATH
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
DEFAULT_ARCHS = "80;90"
CACHE_KEEP = 4  # builds kept in the cache, newest first


def find_nvcc() -> tuple[str | None, str]:
    """(path to nvcc, "") or (None, why no extension is built)."""
    if os.environ.get("MSLORA_SKIP_CUDA_BUILD", "") not in ("", "0"):
        return None, "MSLORA_SKIP_CUDA_BUILD is set"
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc"), ""
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc, ""
    return None, "nvcc was not found in $CUDA_HOME/bin, $CUDA_PATH/bin or on PATH"


def csrc_sources() -> list[str]:
    """Every .cu and .cpp file under csrc/, relative to the project root, in a stable order."""
    found = []
    for ext in ("cu", "cpp"):
        found += glob.glob(os.path.join(CSRC, "**", f"*.{ext}"), recursive=True)
    return sorted(found)


def gencode_flags(archs: str | None = None) -> list[str]:
    """``-gencode`` flags: SASS for each SM in ``archs`` ("80;90"), PTX for the highest."""
    archs = archs or os.environ.get("MSLORA_CUDA_ARCHS", DEFAULT_ARCHS)
    sms = sorted({int(a) for a in archs.replace(",", ";").split(";") if a.strip()})
    flags = []
    for sm in sms:
        flags += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    flags += ["-gencode", f"arch=compute_{sms[-1]},code=compute_{sms[-1]}"]
    return flags


def max_jobs() -> int:
    env = os.environ.get("MAX_JOBS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(4, os.cpu_count() or 1))


def cache_dir() -> str | None:
    """The build cache's folder, or None when MSLORA_CUDA_BUILD_CACHE=0 turns it off."""
    env = os.environ.get("MSLORA_CUDA_BUILD_CACHE", "")
    if env == "0":
        return None
    return os.path.abspath(env) if env else os.path.join(ROOT, "build", "nvcc-cache")


def cache_key(nvcc: str, flags: list[str], root: str = ROOT) -> str:
    """A digest of everything the built module depends on: setup.py, every file under csrc/
    (headers too), the nvcc flags other than include folders (those name pip's temporary build
    environment), nvcc's version, pybind11's and the Python ABI the module is built for."""
    import pybind11

    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    add("setup.py", read(os.path.join(root, "setup.py")))
    csrc = os.path.join(root, CSRC)
    for path in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            add(os.path.relpath(path, csrc).replace(os.sep, "/"), read(path))
    add("flags", " ".join(f for f in flags if not f.startswith("-I")).encode())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    add("nvcc", version.stdout.encode())
    add("pybind11", pybind11.__version__.encode())
    add("python", (sysconfig.get_config_var("EXT_SUFFIX") or "").encode())
    return h.hexdigest()[:32]


def _copy_into_place(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` through a new file renamed over it: a reader never sees it half
    written, and a loaded module at ``dst`` is replaced, not rewritten in place."""
    tmp = f"{dst}.{os.getpid()}.tmp"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dst)


def cache_fetch(path: str, out: str) -> bool:
    """Copy the cached build ``path`` to ``out``; False (so: compile) when there is none or it
    cannot be copied. The cache never fails a build."""
    if not os.path.isfile(path):
        return False
    try:
        _copy_into_place(path, out)
    except OSError as e:
        print(f"mslora-kernels: cannot reuse {path} ({e}); compiling", file=sys.stderr)
        return False
    try:
        os.utime(path)  # newest first when the cache is pruned
    except OSError:
        pass
    print(f"mslora-kernels: reusing the CUDA extension built from the same sources, flags and "
          f"tools: {path}", flush=True)
    return True


def cache_store(path: str, built: str) -> None:
    """Copy ``built`` into the cache as ``path`` (``<name>-<key>.so``) and keep only the newest
    builds of that name; other files in the folder are left alone. A failure (an unwritable
    folder) is said, not raised: the cache never fails a build."""
    folder, name = os.path.split(path)
    try:
        os.makedirs(folder, exist_ok=True)
        _copy_into_place(built, path)
        same_name = glob.glob(os.path.join(folder, glob.escape(name.rsplit("-", 1)[0]) + "-*.so"))
        for old in sorted(same_name, key=os.path.getmtime, reverse=True)[CACHE_KEEP:]:
            os.remove(old)
    except OSError as e:
        print(f"mslora-kernels: the build was not cached in {folder} ({e})", file=sys.stderr)


class NvccExtension(Extension):
    """An extension whose every source is compiled and linked by nvcc."""


class NvccBuildExt(build_ext):
    """Compiles NvccExtension sources with nvcc in parallel and links them with nvcc."""

    def build_extension(self, ext):
        if not isinstance(ext, NvccExtension):
            return super().build_extension(ext)
        import pybind11  # a build requirement (pyproject.toml), imported only when building

        nvcc = ext.nvcc
        includes = [os.path.join(ROOT, CSRC), pybind11.get_include(),
                    sysconfig.get_paths()["include"]]
        flags = ["-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC",
                 "-Xcompiler", "-fvisibility=hidden", *gencode_flags()]
        flags += [f"-I{d}" for d in includes]
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        folder = cache_dir()
        cached = folder and os.path.join(folder, f"{ext.name}-{cache_key(nvcc, flags)}.so")
        if cached and cache_fetch(cached, out):
            return
        objdir = os.path.join(os.path.abspath(self.build_temp), "nvcc")
        os.makedirs(objdir, exist_ok=True)

        def compile_one(src: str) -> str:
            obj = os.path.join(objdir, src.replace(os.sep, "_") + ".o")
            cmd = [nvcc, "-c", os.path.join(ROOT, src), "-o", obj, *flags]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return obj

        with ThreadPoolExecutor(max_workers=max_jobs()) as pool:
            objects = list(pool.map(compile_one, ext.sources))
        cmd = [nvcc, "-shared", "--cudart", "static", *objects, "-o", out]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        if cached:
            cache_store(cached, out)


def extensions() -> list[Extension]:
    nvcc, why = find_nvcc()
    sources = csrc_sources()
    if nvcc is None:
        print(f"mslora-kernels: building no CUDA extension: {why}", file=sys.stderr)
        return []
    if not sources:
        print("mslora-kernels: building no CUDA extension: csrc/ has no .cu or .cpp files",
              file=sys.stderr)
        return []
    ext = NvccExtension("mslora_kernels._C", sources=sources)
    ext.nvcc = nvcc
    return [ext]


setup(ext_modules=extensions(), cmdclass={"build_ext": NvccBuildExt})
