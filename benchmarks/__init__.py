"""End-to-end DP-SGD benchmarks.

``python -m benchmarks.run`` (the runner; ``--suite end_to_end`` is the published grid),
``benchmarks.report`` (plots, the README table and docs/performance.md's tables),
``benchmarks.overhead`` (per-step CPU overhead), ``benchmarks.profile_step`` (GPU time by kernel family),
``benchmarks.tail`` (the DP tail). ``benchmarks.history`` keeps each suite's latest result under a stable
name in ``benchmarks/results/`` and the runs it replaced in ``benchmarks/results/history.jsonl``.

Kernel micro-benchmarks live in ``benchmarks/kernels/``.
"""
