"""pytest-benchmark runs of the providers (``pytest benchmarks --benchmark-only``).

This folder is outside the package's test suite (``testpaths = ["tests"]``): it is collected only
when named. Without a CUDA device only the eager reference runs, at tiny sizes, and the numbers
mean nothing for the GPU; the summary says so.
"""

from __future__ import annotations

import torch

CPU_NOTE = ("benchmarks: no CUDA device here, so only the eager reference ran, at tiny sizes; "
            "these numbers mean nothing for the GPU")


def pytest_report_header(config):
    return CPU_NOTE if not torch.cuda.is_available() else None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not torch.cuda.is_available():
        terminalreporter.write_sep("=", CPU_NOTE, yellow=True)
