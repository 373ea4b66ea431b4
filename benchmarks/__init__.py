"""End-to-end DP-SGD benchmarks (DESIGN §6).

``python -m benchmarks.run`` (the runner), ``benchmarks.report`` (plots, README table),
``benchmarks.overhead`` (per-step Python overhead).

Kernel micro-benchmarks live in ``benchmarks/kernels/``.
"""
