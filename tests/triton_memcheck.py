"""A memcheck for Triton kernels run by the interpreter (TRITON_INTERPRET=1), for the tests.

On a GPU, compute-sanitizer's memcheck reports a load or store outside every allocation. The
interpreter has nothing like it: a kernel's unmasked lane past a tensor's end reads whatever
lies there, or writes over it, and the result may well still match the reference. Inside
:func:`triton_memcheck`, every launch records the memory its tensor arguments span (each one's
own view: the elements its sizes and strides reach, not its whole storage, so a slice of a
workspace counts only as itself), and every load, store and atomic checks that each lane its mask
lets through touches only that memory. The first one that does not raises, naming the kernel, the
operation and the address; the interpreter reports it as the launch's error.

conftest.py turns it on for every test when the interpreter runs the kernels.
"""

from __future__ import annotations

import contextlib
import threading
from unittest import mock

import numpy as np
import torch


class TritonMemcheckError(RuntimeError):
    pass


_state = threading.local()  # .launches: a stack of (kernel name, lo, hi) for the running launches


def _tensors(arg):
    if isinstance(arg, torch.Tensor):
        yield arg
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            yield from _tensors(a)


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, one past the last byte] of the elements t's sizes and strides reach."""
    if t.numel() == 0:
        return None
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _merged(extents) -> tuple[np.ndarray, np.ndarray]:
    """The union of the extents as sorted, disjoint [lo, hi) intervals."""
    spans = sorted(e for e in extents if e is not None)
    lo, hi = [], []
    for a, b in spans:
        if lo and a <= hi[-1]:
            hi[-1] = max(hi[-1], b)
        else:
            lo.append(a)
            hi.append(b)
    return np.array(lo, dtype=np.uint64), np.array(hi, dtype=np.uint64)


def _check(op: str, ptrs, mask) -> None:
    launches = getattr(_state, "launches", None)
    if not launches:
        return
    kernel, lo, hi = launches[-1]
    addr = np.asarray(ptrs.data).astype(np.uint64).ravel()
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()
        addr = addr[m]
    if addr.size == 0:
        return
    size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    i = np.searchsorted(lo, addr, side="right").astype(np.int64) - 1
    ok = i >= 0
    ok[ok] = addr[ok] + np.uint64(size) <= hi[i[ok]]
    if not ok.all():
        bad = addr[~ok]
        spans = [f"[{int(a):#x}, {int(b):#x})" for a, b in zip(lo, hi, strict=True)]
        raise TritonMemcheckError(
            f"Triton memcheck: kernel {kernel}: {op} of {bad.size} lane(s) outside every tensor "
            f"argument ({size}-byte elements), first at {int(bad[0]):#x}; the arguments span "
            + ", ".join(spans[:6]) + (f" and {len(spans) - 6} more" if len(spans) > 6 else ""))


@contextlib.contextmanager
def triton_memcheck():
    """Checks every interpreted launch inside the block (see the module docstring)."""
    from triton.runtime import interpreter as interp

    executor, builder = interp.GridExecutor, interp.interpreter_builder
    orig_init, orig_call = executor._init_args_hst, executor.__call__
    orig = {name: getattr(builder, name) for name in (
        "create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        tensors = [*_tensors(args_hst), *_tensors(list(kwargs_hst.values()))]
        lo, hi = _merged(_extent(t) for t in tensors)
        _state.launches[-1] = (self.fn.__name__, lo, hi)
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        _state.launches = getattr(_state, "launches", [])
        _state.launches.append((self.fn.__name__, np.array([], np.uint64), np.array([], np.uint64)))
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _state.launches.pop()

    def masked_load(ptrs, mask, *rest):
        _check("load", ptrs, mask)
        return orig["create_masked_load"](ptrs, mask, *rest)

    def masked_store(ptrs, value, mask, *rest):
        _check("store", ptrs, mask)
        return orig["create_masked_store"](ptrs, value, mask, *rest)

    def atomic_rmw(op, ptr, val, mask, *rest):
        _check("atomic", ptr, mask)
        return orig["create_atomic_rmw"](op, ptr, val, mask, *rest)

    def atomic_cas(ptr, cmp, val, *rest):
        _check("atomic_cas", ptr, None)
        return orig["create_atomic_cas"](ptr, cmp, val, *rest)

    # mock.patch.object restores each attribute as it was (the builder's methods are the
    # class's: the instance is left without attributes of its own again)
    with contextlib.ExitStack() as patches:
        for target, name, fn in ((executor, "_init_args_hst", init_args_hst),
                                 (executor, "__call__", call),
                                 (builder, "create_masked_load", masked_load),
                                 (builder, "create_masked_store", masked_store),
                                 (builder, "create_atomic_rmw", atomic_rmw),
                                 (builder, "create_atomic_cas", atomic_cas)):
            patches.enter_context(mock.patch.object(target, name, fn))
        yield
