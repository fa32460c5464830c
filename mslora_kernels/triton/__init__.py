"""Triton kernels (``_name_kernel``) and their launchers (``name_fwd`` / ``name_bwd``).

Every kernel module here exposes ``compile_cases()``: the full list of configurations its
launchers can pick. The compile check (:mod:`mslora_kernels.checks.triton_compile`) compiles each
one for sm_90 and sm_80, so no configuration reaches a GPU uncompiled.

Nothing here is imported by ``import mslora_kernels``: triton decides at ``@triton.jit`` time
whether a kernel is interpreted (``TRITON_INTERPRET=1``), so the kernel modules load on first use.
"""
