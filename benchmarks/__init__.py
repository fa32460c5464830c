"""mslora-kernels benchmarks: eager vs torch.compile vs Triton vs CUDA, against the roofline.

    python -m benchmarks.run [--quick] [--out DIR]        # the runner (see benchmarks/run.py)
    python -m benchmarks.readme DIR                       # README snippet from a results dir
    pytest benchmarks --benchmark-only                    # pytest-benchmark view of the providers

Layers: ``presets`` (shapes), ``floors`` (roofline arithmetic and issue 3's goals), ``measure``
(timers, copy bandwidth, FMA rate, peak memory, stamps), ``providers`` (what is timed),
``e2e`` (one training step of timm models), ``report`` (JSON, CSV, markdown, plots).
"""
