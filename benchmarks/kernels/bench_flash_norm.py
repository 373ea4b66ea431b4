"""Benchmark the norm kernels on one GPU: flash vs cuBLAS vs the PyTorch reference, and Gram vs flash.

For x: [B, T, d], g: [B, T, p] the flash norm does N = 2·B·T·d·p FLOPs, the same work as the
weight-gradient GEMM Gᵀ X over all B·T rows, which cuBLAS runs as ``g.view(-1, p).t() @ x.view(-1, d)``.
Reported: median time (``triton.testing.do_bench``, L2 flushed between runs), TFLOP/s = N / time,
``vs_cublas`` = cuBLAS time / kernel time (≥ 1: faster than cuBLAS) and ``vs_reference`` likewise.
bf16 rows run with TF32 off, fp32 rows with TF32 on (cuBLAS and the kernel both follow
``torch.backends.cuda.matmul.allow_tf32``).

Also: the Gram/flash crossover (both kernels for T = 64…4096 at d = p = 768 and 1024), the
clipped-gradient assembly (scaling + cuBLAS vs the fused kernel vs cuBLAS alone; ``--only clipped``),
the LayerNorm/RMSNorm per-sample gradients (the affine_norm kernel vs its reference; ``--only affine``), and with ``--sweep`` a sweep of tile configs. Usage::

    PYTHONPATH=. python benchmarks/kernels/bench_flash_norm.py --out "$OUT" [--sweep] [--plot]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from flashnorm.kernels import (
    clipped_weight_grad_fused,
    clipped_weight_grad_reference,
    flash_norm_sq_reference,
    gram_norm_sq,
    weighted_row_sum,
)
from benchmarks.history import git_commit  # the runner's record (FLASHNORM_GIT_COMMIT on a copied tree)
from flashnorm.kernels.affine_norm import affine_norm_grads_reference, affine_norm_grads_triton
from flashnorm.kernels.flash_norm import FlashConfig, flash_norm_launch, flash_norm_sq_triton
from flashnorm.kernels.gram_norm import GramConfig, gram_norm_sq_triton

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
MAIN_BATCHES = (1, 8)
MAIN_STEPS = (4100, 8196, 65536)
MAIN_DIMS = ((1024, 1024), (768, 3072), (4096, 4096), (4096, 11008))
CROSS_STEPS = (64, 128, 256, 512, 1024, 2048, 4096)
CROSS_DIMS = (768, 1024)
MAX_INPUT_BYTES = 40e9
REFERENCE_MAX_FLOPS = 3e12  # the reference is timed on shapes up to this much work


def timed(fn, rep_ms: float = 100.0) -> float:
    """Median milliseconds of fn() (do_bench, L2 flushed); slow functions get 1 warm-up and 3 timed runs."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = (time.perf_counter() - start) * 1e3
    if once > 50:
        times = []
        for _ in range(3):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        return sorted(times)[1]
    return do_bench(fn, warmup=max(5.0, 2 * once), rep=rep_ms, return_mode="median")


def graph_timed(fn, rep_ms: float = 100.0) -> float:
    """Median milliseconds of fn() replayed in a CUDA graph: GPU time without the launch overhead."""
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def inputs(batch, steps, d, p, dtype):
    return (torch.randn(batch, steps, d, device="cuda", dtype=dtype),
            torch.randn(batch, steps, p, device="cuda", dtype=dtype))  # fmt: skip


def set_tf32(dtype_name: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "fp32"


def rel_err(out, x, g):
    """Relative error of one sample's norm against float64 (sample 0, direct einsum)."""
    w = torch.einsum("tp,td->pd", g[0].double(), x[0].double())
    truth = w.square().sum().item()
    return abs(out[0].item() - truth) / truth


def bench_main(rows, log, only=None):
    """Flash kernel vs cuBLAS (and the reference) over the main grid, or only the (dtype, B, T, d, p) in ``only``."""
    for name in ("bf16", "fp32"):
        dtype = DTYPES[name]
        set_tf32(name)
        for d, p in MAIN_DIMS:
            for batch in MAIN_BATCHES:
                for steps in MAIN_STEPS:
                    if batch * steps * (d + p) * dtype.itemsize > MAX_INPUT_BYTES:
                        continue
                    if only is not None and (name, batch, steps, d, p) not in only:
                        continue
                    x, g = inputs(batch, steps, d, p, dtype)
                    flops = 2 * batch * steps * d * p
                    x2, g2 = x.view(-1, d), g.view(-1, p)
                    row = dict(kernel="flash", dtype=name, B=batch, T=steps, d=d, p=p, flops=flops)
                    row["ms"] = timed(lambda: flash_norm_sq_triton(x, g))
                    row["cublas_ms"] = timed(lambda: g2.t() @ x2)
                    if flops <= REFERENCE_MAX_FLOPS:
                        row["reference_ms"] = timed(lambda: flash_norm_sq_reference(x, g), rep_ms=50)
                        row["vs_reference"] = row["reference_ms"] / row["ms"]
                    row["tflops"] = flops / row["ms"] / 1e9
                    row["cublas_tflops"] = flops / row["cublas_ms"] / 1e9
                    row["vs_cublas"] = row["cublas_ms"] / row["ms"]
                    if row["ms"] < 2.0:  # launch overhead matters: also time GPU work alone
                        row["graph_ms"] = graph_timed(lambda: flash_norm_sq_triton(x, g))
                        row["cublas_graph_ms"] = graph_timed(lambda: g2.t() @ x2)
                        row["graph_vs_cublas"] = row["cublas_graph_ms"] / row["graph_ms"]
                    row["gpu_ms"] = row.get("graph_ms", row["ms"])  # eager ≈ GPU time past 2 ms
                    row["cublas_gpu_ms"] = row.get("cublas_graph_ms", row["cublas_ms"])
                    row["gpu_tflops"] = flops / row["gpu_ms"] / 1e9
                    row["cublas_gpu_tflops"] = flops / row["cublas_gpu_ms"] / 1e9
                    row["gpu_vs_cublas"] = row["cublas_gpu_ms"] / row["gpu_ms"]
                    if steps <= 8196 and d * p <= 4096 * 4096:
                        row["rel_err_sample0"] = rel_err(flash_norm_sq_triton(x, g), x, g)
                        w = (g[0].t() @ x[0]).double()  # cuBLAS in the same precision, for comparison
                        truth = torch.einsum("tp,td->pd", g[0].double(), x[0].double()).square().sum().item()
                        row["cublas_rel_err_sample0"] = abs(w.square().sum().item() - truth) / truth
                    rows.append(row)
                    log(row)
                    del x, g, x2, g2
                    torch.cuda.empty_cache()


def bench_crossover(rows, log):
    for name in ("bf16", "fp32"):
        dtype = DTYPES[name]
        set_tf32(name)
        for dim in CROSS_DIMS:
            for batch in MAIN_BATCHES:
                for steps in CROSS_STEPS:
                    x, g = inputs(batch, steps, dim, dim, dtype)
                    row = dict(kernel="crossover", dtype=name, B=batch, T=steps, d=dim, p=dim)
                    row["flash_ms"] = timed(lambda: flash_norm_sq_triton(x, g), rep_ms=50)
                    row["gram_ms"] = timed(lambda: gram_norm_sq_triton(x, g), rep_ms=50)
                    row["gram_faster"] = row["gram_ms"] < row["flash_ms"]
                    row["flash_graph_ms"] = graph_timed(lambda: flash_norm_sq_triton(x, g), rep_ms=50)
                    row["gram_graph_ms"] = graph_timed(lambda: gram_norm_sq_triton(x, g), rep_ms=50)
                    row["gram_faster_graph"] = row["gram_graph_ms"] < row["flash_graph_ms"]
                    rows.append(row)
                    log(row)


#: (dtype, B, T, d, p) of the clipped-gradient rows: the GPT-2 small layers at B=8, T=1024 (its head too),
#: Llama-1B's MLP at B=8, T=1024 and the issue's large shapes.
CLIPPED_SHAPES = (
    ("bf16", 8, 1024, 768, 2304), ("bf16", 8, 1024, 768, 3072), ("bf16", 8, 1024, 3072, 768), ("bf16", 8, 1024, 768, 768),
    ("bf16", 8, 1024, 768, 50257), ("bf16", 8, 1024, 2048, 8192), ("bf16", 8, 1024, 8192, 2048),
    ("bf16", 8, 4096, 1024, 1024), ("bf16", 1, 65536, 4096, 4096),
    ("bf16", 8, 4096, 4096, 11008), ("bf16", 4, 4096, 2048, 8192), ("fp32", 8, 4096, 1024, 1024), ("fp32", 4, 1030, 768, 768),
)  # fmt: skip


def bench_clipped_grad(rows, log):
    """Σ_b c_b G_bᵀX_b three ways: scaling G by c_b then one cuBLAS GEMM (the reference: in float32 for 16-bit
    inputs, since rounding c ⊙ G to 16 bits would leave the rounding allowance), the fused Triton kernel (aligned
    copies on unaligned rows), and the GEMM alone in the inputs' dtype (no scaling: the floor, what non-DP
    training pays). Error of each against float64 on a column slice."""
    for name, batch, steps, d, p in CLIPPED_SHAPES:
        set_tf32(name)
        x, g = inputs(batch, steps, d, p, DTYPES[name])
        coef = torch.rand(batch, device="cuda")
        x2, g2 = x.view(-1, d), g.view(-1, p)
        row = dict(kernel="clipped_weight_grad", dtype=name, B=batch, T=steps, d=d, p=p)
        row["scaled_gemm_ms"] = timed(lambda: clipped_weight_grad_reference(x, g, coef))
        row["fused_ms"] = timed(lambda: clipped_weight_grad_fused(x, g, coef))
        row["gemm_only_ms"] = timed(lambda: g2.t() @ x2)
        row["scaling_overhead"] = row["scaled_gemm_ms"] / row["gemm_only_ms"] - 1
        row["fused_vs_scaled"] = row["scaled_gemm_ms"] / row["fused_ms"]
        row["fused_vs_gemm"] = row["gemm_only_ms"] / row["fused_ms"]
        cols = slice(0, min(d, 64))  # float64 truth of 64 output columns, sample by sample
        truth = sum(coef[b].double() * g[b].double().t() @ x[b, :, cols].double() for b in range(batch))
        scale = truth.abs().max().item()
        row["scaled_err"] = (clipped_weight_grad_reference(x, g, coef)[:, cols].double() - truth).abs().max().item() / scale
        row["fused_err"] = (clipped_weight_grad_fused(x, g, coef)[:, cols].double() - truth).abs().max().item() / scale
        rows.append(row)
        log(row)
        del x, g, x2, g2
        torch.cuda.empty_cache()


def host_us(fn, calls: int, warmup: int) -> float:
    """Host µs per call of fn(): CPU wall time over ``calls`` calls, the GPU not waited for in between."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def bench_launch_cost(rows, log):
    """Host time per call (µs, CPU wall over 300 calls, GPU not waited for) at B·T = 128 rows, where a launch
    costs more than its GPU work: each kernel wrapper with and without tensor descriptors, and torch ops."""
    x, g = inputs(8, 16, 768, 2304, torch.bfloat16)
    coef, rows_ = torch.rand(8, device="cuda"), torch.randn(8, 1 << 17, device="cuda")
    calls = {
        "flash_tma": lambda: flash_norm_sq_triton(x, g, use_tma=True),
        "flash_pointers": lambda: flash_norm_sq_triton(x, g, use_tma=False),
        "gram_tma": lambda: gram_norm_sq_triton(x, g, use_tma=True),
        "gram_pointers": lambda: gram_norm_sq_triton(x, g, use_tma=False),
        "gram_norm_sq_default": lambda: gram_norm_sq(x, g),
        "fused_clipped_default": lambda: clipped_weight_grad_fused(x, g, coef),
        "weighted_row_sum": lambda: weighted_row_sum(coef, rows_),
        "torch_mm": lambda: g.view(-1, 2304).t() @ x.view(-1, 768),
        "torch_zeros": lambda: torch.zeros(8, device="cuda"),
    }
    for name, fn in calls.items():
        row = dict(kernel="launch_cost", call=name, B=8, T=16, d=768, p=2304, host_us=host_us(fn, calls=300, warmup=20))
        rows.append(row)
        log(row)


#: (B, T, n, LayerNorm?) of the normalisation layers in the end-to-end workloads: GPT-2's LayerNorm, Llama's RMSNorm.
AFFINE_SHAPES = ((8, 1024, 768, True), (1, 4096, 768, True), (1, 16384, 768, True), (4, 4096, 2048, False))


def bench_affine_norm(rows, log):
    """Per-sample LayerNorm/RMSNorm (weight, bias) gradients: the Triton kernel against its PyTorch reference,
    GPU µs (CUDA-graph replay), host µs per call (GPU not waited for) and the largest error relative to
    float64 over the weight gradients (normalised by the largest |entry|; the reference run in float64)."""
    for name in ("bf16", "fp32"):
        for batch, steps, n, center in AFFINE_SHAPES:
            x, g = inputs(batch, steps, n, n, DTYPES[name])
            eps = 1e-5
            truth = affine_norm_grads_reference(x.double(), g.double(), eps=eps, center=center, with_bias=False)[0]
            row = dict(kernel="affine_norm", dtype=name, B=batch, T=steps, n=n, norm="layer" if center else "rms")
            for label, fn in (("triton", affine_norm_grads_triton), ("reference", affine_norm_grads_reference)):
                call = functools.partial(fn, x, g, eps=eps, center=center, with_bias=center)
                row[f"{label}_gpu_us"] = graph_timed(call) * 1e3
                row[f"{label}_host_us"] = host_us(call, calls=200, warmup=10)
                weight = call()[0].double()
                row[f"{label}_rel_err"] = ((weight - truth).abs().max() / truth.abs().max()).item()
            row["gpu_speedup"] = row["reference_gpu_us"] / row["triton_gpu_us"]
            row["host_speedup"] = row["reference_host_us"] / row["triton_host_us"]
            rows.append(row)
            log(row)
            del x, g, truth
            torch.cuda.empty_cache()


#: Shapes of the descriptor trade-off: GPT-2's at B = 8, T = 1024 and B = 1, T = 4096, the Linear stack's, Llama's.
TMA_SHAPES = ((8, 1024, 768, 2304), (8, 1024, 768, 768), (8, 1024, 3072, 768), (1, 4096, 768, 3072),
              (4, 4096, 1024, 1024), (4, 16384, 1024, 1024), (4, 4096, 2048, 2048), (4, 4096, 2048, 5632))


def bench_tma_tradeoff(rows, log):
    """Tensor descriptors against pointer loads, per launch: host µs (CPU wall over 100 calls, GPU not waited
    for) and GPU µs (CUDA-graph replay) of the flash norm and the fused clipped gradient, bf16 and fp32 (TF32 off).
    The descriptors cost the host (the launcher encodes two tensor maps per launch); they pay only where
    the GPU time they save exceeds that, i.e. on launches long enough that the step waits for the GPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in ("bf16", "fp32"):
        for batch, steps, d, p in TMA_SHAPES:
            x, g = inputs(batch, steps, d, p, DTYPES[name])
            coef = torch.rand(batch, device="cuda")
            row = dict(kernel="tma_tradeoff", dtype=name, B=batch, T=steps, d=d, p=p, rows_dp=batch * steps * d * p)
            for kernel, call in (("flash", lambda tma: flash_norm_sq_triton(x, g, use_tma=tma)),
                                 ("clipped", lambda tma: clipped_weight_grad_fused(x, g, coef, use_tma=tma))):  # fmt: skip
                for label, tma in (("tma", True), ("pointers", False)):
                    fn = functools.partial(call, tma)
                    row[f"{kernel}_{label}_host_us"] = host_us(fn, calls=100, warmup=10)
                    row[f"{kernel}_{label}_gpu_us"] = graph_timed(fn, rep_ms=50.0) * 1e3
            rows.append(row)
            log(row)
            del x, g
            torch.cuda.empty_cache()


#: (B, T, d, p) of the unaligned rows: GPT-2's LM head (50257 logits per row) at the tied_models suite's shapes.
UNALIGNED_SHAPES = ((8, 1024, 768, 50257), (1, 4096, 768, 50257), (2, 4096, 768, 50257))


def bench_unaligned(rows, log):
    """Rows that are not 16-byte aligned (bf16): pointer loads against the default launch (zero-padded aligned
    copies read through descriptors), CUDA-graph GPU time and eager time, with cuBLAS's G^T X for scale
    (it too runs ``align1`` kernels there) and the peak memory each adds over the inputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for batch, steps, d, p in UNALIGNED_SHAPES:
        x, g = inputs(batch, steps, d, p, torch.bfloat16)
        flops = 2 * batch * steps * d * p
        row = dict(kernel="unaligned", dtype="bf16", B=batch, T=steps, d=d, p=p, flops=flops)
        for label, fn in (("pointers", lambda: flash_norm_sq_triton(x, g, use_tma=False)),
                          ("aligned_copies", lambda: flash_norm_sq_triton(x, g)),
                          ("cublas", lambda: g.view(-1, p).t() @ x.view(-1, d))):  # fmt: skip
            row[f"{label}_ms"] = timed(fn)
            row[f"{label}_graph_ms"] = graph_timed(fn)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            row[f"{label}_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["aligned_copies_speedup"] = row["pointers_graph_ms"] / row["aligned_copies_graph_ms"]
        row["aligned_copies_tflops"] = flops / row["aligned_copies_graph_ms"] / 1e9
        truth = torch.einsum("tp,td->pd", g[0].double(), x[0].double()).square().sum().item()
        row["aligned_copies_rel_err_sample0"] = abs(flash_norm_sq_triton(x, g)[0].item() - truth) / truth
        rows.append(row)
        log(row)
        del x, g
        torch.cuda.empty_cache()


def bench_tf32_operands(rows, log):
    """K-major tf32 path with both operands copied transposed against x alone (g rounded in registers),
    CUDA-graph GPU time against cuBLAS, and the error of each against float64."""
    set_tf32("fp32")
    for batch, steps, d, p in ((8, 4100, 1024, 1024), (8, 8196, 1024, 1024), (8, 1030, 768, 3072), (3, 4100, 2048, 2048),
                               (1, 65536, 4096, 4096)):  # fmt: skip
        x, g = inputs(batch, steps, d, p, torch.float32)
        truth = torch.stack([torch.einsum("tp,td->pd", g[b].double(), x[b].double()).square().sum() for b in range(batch)])
        row = dict(kernel="tf32_operands", B=batch, T=steps, d=d, p=p)
        for name, g_rows in (("both_copied", False), ("x_only", True)):  # errors first, on plain eager calls
            out = flash_norm_sq_triton(x, g, use_tma=True, k_major=True, g_rows=g_rows)
            row[f"{name}_rel_err"] = ((out.double() - truth).abs() / truth).max().item()
        row["cublas_ms"] = graph_timed(lambda: g.view(-1, p).t() @ x.view(-1, d))
        for name, g_rows in (("both_copied", False), ("x_only", True)):
            row[f"{name}_ms"] = graph_timed(functools.partial(flash_norm_sq_triton, x, g, use_tma=True, k_major=True, g_rows=g_rows))
            row[f"{name}_vs_cublas"] = row["cublas_ms"] / row[f"{name}_ms"]
        row["default_vs_cublas"] = row["cublas_ms"] / graph_timed(lambda: flash_norm_sq_triton(x, g))
        rows.append(row)
        log(row)
        del x, g
        torch.cuda.empty_cache()


# (config, k_major) candidates; the call-1 sweep of 16-bit tiles is in benchmarks/results/kernels_h200_sweep1.json
FLASH_SWEEP = {
    "bf16": [(FlashConfig(64, 128, 256, 8, 3), None)],
    "fp32": [(FlashConfig(32, 128, 128, 8, 3), True), (FlashConfig(32, 128, 256, 8, 3), True),
             (FlashConfig(32, 128, 128, 4, 4), True), (FlashConfig(64, 128, 128, 8, 3), True),
             (FlashConfig(32, 256, 128, 8, 3), True), (FlashConfig(16, 128, 256, 8, 4), True),
             (FlashConfig(32, 128, 256, 8, 3), False)],
}  # fmt: skip
GRAM_SWEEP = {
    "bf16": [GramConfig(64, 128, 4, 3), GramConfig(64, 64, 4, 3), GramConfig(128, 128, 8, 3)],
    "fp32": [GramConfig(64, 32, 4, 3), GramConfig(64, 64, 4, 3), GramConfig(128, 32, 8, 3)],
}  # fmt: skip


def bench_sweep(rows, log):
    for name in ("bf16", "fp32"):
        set_tf32(name)
        for batch, steps, d, p in ((1, 16384, 4096, 4096), (8, 4100, 1024, 1024)):
            x, g = inputs(batch, steps, d, p, DTYPES[name])
            flops = 2 * batch * steps * d * p
            cublas = timed(lambda: g.view(-1, p).t() @ x.view(-1, d))
            for cfg, k_major in FLASH_SWEEP[name]:
                row = dict(kernel="sweep_flash", dtype=name, B=batch, T=steps, d=d, p=p, config=list(cfg), k_major=k_major)
                try:
                    row["ms"] = timed(lambda: flash_norm_sq_triton(x, g, config=cfg, k_major=k_major))
                    row["tflops"] = flops / row["ms"] / 1e9
                    row["vs_cublas"] = cublas / row["ms"]
                    row["rel_err_sample0"] = rel_err(flash_norm_sq_triton(x, g, config=cfg, k_major=k_major), x, g)
                except Exception as exc:  # an out-of-resources config is a result, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                log(row)
        for batch, steps, dim in ((8, 1024, 1024), (8, 256, 768)):
            x, g = inputs(batch, steps, dim, dim, DTYPES[name])
            for cfg in GRAM_SWEEP[name]:
                row = dict(kernel="sweep_gram", dtype=name, B=batch, T=steps, d=dim, p=dim, config=list(cfg))
                try:
                    row["ms"] = timed(lambda: gram_norm_sq_triton(x, g, config=cfg), rep_ms=50)
                    row["rel_err_sample0"] = rel_err(gram_norm_sq_triton(x, g, config=cfg), x, g)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                log(row)


def ptx_facts():
    """Which instructions the default configs compile to (bulk tensor copies, wgmma)."""
    facts = {}
    for name in ("bf16", "fp16", "fp32", "fp32-ieee"):
        set_tf32(name)  # "fp32": tf32 on (the K-major path); "fp32-ieee": off
        x, g = inputs(1, 4100, 1024, 1024, DTYPES[name.split("-")[0]])
        _, kernel = flash_norm_launch(x, g)
        ptx = kernel.asm["ptx"]
        facts[name] = {
            "cp.async.bulk.tensor": "cp.async.bulk.tensor" in ptx,
            "wgmma": "wgmma.mma_async" in ptx,
            "mma.sync": "mma.sync" in ptx,
            "registers": getattr(kernel, "n_regs", None),
            "spills": getattr(kernel, "n_spills", None),
            "shared_bytes": kernel.metadata.shared if hasattr(kernel.metadata, "shared") else None,
        }
    return facts


def ceilings():
    """cuBLAS bf16 and tf32 on an 8192³ product: the GPU's GEMM rate here."""
    out = {}
    for name in ("bf16", "fp32"):
        set_tf32(name)
        a = torch.randn(8192, 8192, device="cuda", dtype=DTYPES[name])
        b = torch.randn(8192, 8192, device="cuda", dtype=DTYPES[name])
        out[f"cublas_{name}_8192_tflops"] = 2 * 8192**3 / timed(lambda: a @ b) / 1e9
    return out


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cross = [r for r in result["rows"] if r["kernel"] == "crossover"]
    if cross:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(18, 7), gridspec_kw={"width_ratios": [3, 2]})
    else:  # a run of the main rows alone: no crossover panel
        fig, ax1 = plt.subplots(1, 1, figsize=(11, 7))
    main = [r for r in result["rows"] if r["kernel"] == "flash"]
    labels = [f"{r['dtype']} B{r['B']} T{r['T']} {r['d']}x{r['p']}" for r in main]
    pos = range(len(main))
    ax1.bar([i - 0.2 for i in pos], [r["gpu_tflops"] for r in main], width=0.4, label="flash_norm_sq (Triton)")
    ax1.bar([i + 0.2 for i in pos], [r["cublas_gpu_tflops"] for r in main], width=0.4, label="cuBLAS Gᵀ X (same FLOPs)")
    ax1.set_xticks(list(pos), labels, rotation=90, fontsize=7)
    ax1.set_ylabel("TFLOP/s")
    ax1.set_title("GPU time (CUDA graph under 2 ms): flash norms vs a cuBLAS GEMM of the same work (fp32 = TF32)", fontsize=9)
    ax1.legend()
    if cross:
        plot_crossover(ax2, cross)
    fig.suptitle(result["env"]["gpu"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_crossover(ax2, cross):
    """Gram / flash GPU time against T, one line per (dtype, d = p, B)."""
    for dtype, style in (("bf16", "-"), ("fp32", "--")):
        for dim in CROSS_DIMS:
            for batch in MAIN_BATCHES:
                rs = [r for r in cross if r["dtype"] == dtype and r["d"] == dim and r["B"] == batch]
                if not rs:
                    continue
                line = ax2.plot([r["T"] for r in rs], [r["gram_graph_ms"] / r["flash_graph_ms"] for r in rs], style, marker="o")
                line[0].set_label(f"{dtype} d=p={dim} B={batch}")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("T")
    ax2.set_ylabel("Gram GPU time / flash GPU time (< 1: Gram faster)")
    ax2.set_title("Gram vs flash crossover")
    ax2.legend(fontsize=7)


def print_table(rows):
    """GPU time (CUDA-graph replay under 2 ms, else eager) and, beside it, eager time with launch overhead."""
    print(f"{'kernel':6} {'dtype':5} {'B':>2} {'T':>6} {'d x p':>11} {'GPU ms':>8} {'TFLOP/s':>7} {'cuBLAS':>7} "
          f"{'vs cuBLAS':>9} {'eager ms':>8} {'eager vs':>8} {'vs ref':>7}")  # fmt: skip
    for r in rows:
        if r["kernel"] == "flash":
            ref = f"{r['vs_reference']:.1f}x" if "vs_reference" in r else "-"
            print(f"{'flash':6} {r['dtype']:5} {r['B']:>2} {r['T']:>6} {r['d']:>5}x{r['p']:<5} {r['gpu_ms']:8.3f} "
                  f"{r['gpu_tflops']:7.1f} {r['cublas_gpu_tflops']:7.1f} {r['gpu_vs_cublas']:9.2f} {r['ms']:8.3f} "
                  f"{r['vs_cublas']:8.2f} {ref:>7}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--name", default="kernels_h200")
    parser.add_argument("--sweep", action="store_true", help="also sweep tile configs")
    parser.add_argument("--no-main", action="store_true", help="skip the main table and the crossover")
    parser.add_argument("--only", help="comma list of sections to run alone: main, crossover, clipped, launch, affine, tma, tf32, sweep, unaligned")
    parser.add_argument("--main-shapes", help="main rows only for these dtype:B:T:d:p, comma separated")
    parser.add_argument("--plot", action="store_true", help="write a PNG beside the JSON")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a saved result (no GPU needed)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), os.path.join(args.out, f"{args.name}.png"))
        return
    props = torch.cuda.get_device_properties(0)
    result = {
        "env": {
            "gpu": props.name, "sms": props.multi_processor_count, "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "command": " ".join(sys.argv), "git": git_commit(),
        },
        "rows": [],
    }  # fmt: skip
    log_path = os.path.join(args.out, f"{args.name}.log")

    def log(row):
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def save():
        with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
            json.dump(result, f, indent=1)

    result["ptx"] = ptx_facts()
    log(result["ptx"])
    result["ceilings"] = ceilings()
    log(result["ceilings"])
    save()
    only = None
    if args.main_shapes:
        only = {(f[0], *map(int, f[1:])) for f in (item.split(":") for item in args.main_shapes.split(","))}

    def main_rows(rows, log):
        bench_main(rows, log, only)

    named = {"main": main_rows, "crossover": bench_crossover, "clipped": bench_clipped_grad,
             "launch": bench_launch_cost, "affine": bench_affine_norm, "tma": bench_tma_tradeoff, "tf32": bench_tf32_operands, "sweep": bench_sweep,
             "unaligned": bench_unaligned}  # fmt: skip
    if args.only:
        sections = [named[name] for name in args.only.split(",")]
    else:
        sections = ([bench_sweep] if args.sweep else []) + ([] if args.no_main else [main_rows, bench_crossover, bench_clipped_grad, bench_launch_cost, bench_tf32_operands])
    for section in sections:
        try:
            section(result["rows"], log)
        except Exception as exc:  # keep what was measured
            result.setdefault("errors", []).append(f"{section.__name__}: {type(exc).__name__}: {exc}")
            log({"error": result["errors"][-1]})
        save()
    if args.plot and any(r["kernel"] == "flash" for r in result["rows"]):
        plot(result, os.path.join(args.out, f"{args.name}.png"))
    print_table(result["rows"])
    cross = [r for r in result["rows"] if r["kernel"] == "crossover"]
    for dtype in ("bf16", "fp32"):
        for dim in CROSS_DIMS:
            for batch in MAIN_BATCHES:
                rs = [r for r in cross if r["dtype"] == dtype and r["d"] == dim and r["B"] == batch]
                faster = [r["T"] for r in rs if r["gram_faster_graph"]]
                if rs:
                    print(f"crossover {dtype} d=p={dim} B={batch}: Gram faster (GPU time) at T in {faster}; gram/flash "
                          + " ".join(f"T{r['T']}:{r['gram_graph_ms'] / r['flash_graph_ms']:.2f}" for r in rs))  # fmt: skip


if __name__ == "__main__":
    main()
