"""What a call launches, for the launch-count tests (tests/test_triton_mslora.py,
tests/test_cuda_host.py): a dispatch mode that records every aten op that would launch a kernel
on a GPU, next to the kernels the test records itself. An op's own inner ops are not visible to a
dispatch mode wrapped around the op, hence the tests wrap the launchers. Also the hook on every
interpreted Triton launch (``interpreted_launches``), for those tests and the launch-option test
(tests/test_triton_harness.py)."""

from __future__ import annotations

from contextlib import contextmanager

from torch.utils._python_dispatch import TorchDispatchMode

# Aten ops that launch no kernel: allocation only, and reshape's view of a fresh copy (views are
# told apart by ``is_view``).
NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                       "detach", "lift_fresh", "split_with_sizes", "_unsafe_view"})


class AtenLaunches(TorchDispatchMode):
    """Appends ``namespace.op`` to ``launched`` for every aten op that would launch a kernel on a
    GPU (not a view, not an allocation), except while ``paused`` is above 0 (inside a kernel
    the test records itself, whose emulation runs tensor ops of its own)."""

    def __init__(self, launched: list):
        super().__init__()
        self.launched = launched
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (self.paused or func.is_view or name in NO_KERNEL):
            self.launched.append(f"{func.namespace}.{name}")
        return func(*args, **(kwargs or {}))


@contextmanager
def interpreted_launches(on_launch, paused: AtenLaunches | None = None):
    """Calls ``on_launch(kernel name, launch keyword arguments)`` at every ``kernel[grid](...)``
    under Triton's interpreter (its ``GridExecutor``, in every Triton version), then runs the
    kernel; while it runs, ``paused`` records nothing (the interpreter's own tensor copies are
    not launches)."""
    from triton.runtime.interpreter import GridExecutor

    real = GridExecutor.__call__

    def call(self, *args, **kwargs):
        on_launch(self.fn.__name__, kwargs)
        if paused is not None:
            paused.paused += 1
        try:
            return real(self, *args, **kwargs)
        finally:
            if paused is not None:
                paused.paused -= 1

    GridExecutor.__call__ = call
    try:
        yield
    finally:
        GridExecutor.__call__ = real
