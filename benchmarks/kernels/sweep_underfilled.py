"""Sweeps behind the flash-norm configs of under-filled launches (H200).

GPU time of CUDA-graph replays (no launch overhead). One JSON row per measurement in ``$OUT/kexp.jsonl``::

    PYTHONPATH=. python benchmarks/kernels/sweep_underfilled.py --only split,stages

* ``split``: 16-bit (and tf32) shapes where batch × output tiles under-fills the GPU: tile configs × T-splits
  (the last-arriving program of a tile sums its partials), against cuBLAS doing the same GEMM.
* ``stages``: pipeline depth (3 or 4 stages) of the under-filled tile configs.
* ``tf32``: the float32 K-major path split into its copies and its tiles.
"""

import argparse
import json
import os

import torch
from triton.testing import do_bench_cudagraph
from triton.tools.tensor_descriptor import TensorDescriptor

from flashnorm.kernels import flash_norm_sq_reference
from flashnorm.kernels.flash_norm import FlashConfig, flash_norm_sq_triton, launch_tiles
from flashnorm.kernels.tiles import tf32_copy

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: (T×p×d block, warps, stages) candidates for under-filled launches.
CONFIGS = ((64, 128, 256, 8, 3), (64, 128, 128, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 4),
           (128, 64, 128, 4, 3), (64, 64, 128, 4, 3), (64, 256, 128, 8, 3))  # fmt: skip
#: (dtype, B, T, d, p) of the split sweep: every one under-fills 132 SMs with 128×256 tiles.
SPLIT_SHAPES = (("bf16", 1, 4100, 1024, 1024), ("bf16", 1, 8196, 1024, 1024), ("bf16", 1, 16384, 1024, 1024),
                ("bf16", 3, 4100, 1024, 1024), ("bf16", 1, 4100, 2048, 2048), ("bf16", 1, 4100, 768, 3072),
                ("bf16", 1, 8196, 768, 3072), ("fp16", 1, 4100, 1024, 1024))  # fmt: skip


def gpu_ms(fn, rep=20):
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median")


def sweep_configs(log, exp, shapes, variants):
    """For each (dtype, B, T, d, p): cuBLAS, the default config, then every (FlashConfig, splits) variant
    (splits None: the cost model's choice), each with its error against the float64 reference."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, batch, steps, d, p in shapes:
        dtype = DTYPES[name]
        x, g = torch.randn(batch, steps, d, device="cuda", dtype=dtype), torch.randn(batch, steps, p, device="cuda", dtype=dtype)
        ref = flash_norm_sq_reference(x.double(), g.double())
        cublas = gpu_ms(lambda: g.view(-1, p).t() @ x.view(-1, d))
        base = dict(exp=exp, dtype=name, B=batch, T=steps, d=d, p=p, cublas_ms=cublas)
        for cfg, splits in ((None, None), *variants):
            label = dict(cfg="default") if cfg is None else dict(cfg=list(cfg), splits=splits)
            try:
                err = ((flash_norm_sq_triton(x, g, config=cfg, splits=splits).double() - ref).abs() / ref).max().item()
                ms = gpu_ms(lambda: flash_norm_sq_triton(x, g, config=cfg, splits=splits))
                log(dict(base, **label, ms=ms, ratio=cublas / ms, rel_err=err))
            except Exception as e:  # a config that does not compile (shared memory): recorded, not fatal
                log(dict(base, **label, error=str(e)[:160]))


def split_sweep(log):
    variants = [(FlashConfig(*c), s) for c in CONFIGS for s in (1, 2, 3, 4, 6)]
    sweep_configs(log, "split", SPLIT_SHAPES, variants)


STAGES_SHAPES = (("bf16", 1, 4096, 1024, 1024), ("bf16", 1, 4100, 1024, 1024), ("bf16", 1, 8196, 1024, 1024),
                 ("bf16", 1, 32768, 1024, 1024), ("bf16", 3, 4100, 1024, 1024), ("bf16", 1, 4100, 768, 3072),
                 ("bf16", 1, 4100, 2048, 2048), ("fp16", 1, 4100, 1024, 1024))  # fmt: skip
STAGES_TILES = ((128, 64, 128, 4), (64, 64, 128, 4), (64, 128, 128, 4), (64, 128, 256, 8))


def stages_sweep(log):
    variants = [(FlashConfig(*tile, stages), None) for tile in STAGES_TILES for stages in (3, 4)]
    sweep_configs(log, "stages", STAGES_SHAPES, variants)


def tf32_sweep(log):
    torch.backends.cuda.matmul.allow_tf32 = True
    for steps in (4100, 8196):
        d = p = 1024
        x, g = torch.randn(8, steps, d, device="cuda"), torch.randn(8, steps, p, device="cuda")
        cublas = gpu_ms(lambda: g.view(-1, p).t() @ x.view(-1, d))
        default = gpu_ms(lambda: flash_norm_sq_triton(x, g))
        copies = gpu_ms(lambda: (tf32_copy(x, True), tf32_copy(g, True)))
        log(dict(exp="fp32B8", T=steps, cublas=cublas, default=default, ratio=cublas / default, copies=copies))
        buf = tf32_copy(x, True)[0]
        for br, bc, w in ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (32, 128, 4), (128, 32, 4), (64, 64, 8), (128, 64, 8)):
            ms = gpu_ms(lambda: tf32_copy(x, True, block=(br, bc), num_warps=w, out=buf))
            log(dict(exp="fp32copy", T=steps, block=(br, bc, w), ms=ms, gbps=2 * x.numel() * 4 / ms / 1e6))
        for cfg in map(lambda c: FlashConfig(*c), ((32, 128, 256, 8, 3), (32, 256, 128, 8, 3), (32, 128, 256, 8, 4), (64, 128, 256, 8, 2), (16, 128, 256, 8, 5))):
            try:
                xd = TensorDescriptor(*tf32_copy(x, transpose=True), block_shape=[cfg.block_d, cfg.block_t])
                gd = TensorDescriptor(*tf32_copy(g, transpose=True), block_shape=[cfg.block_p, cfg.block_t])
                ns = torch.zeros(8, device="cuda")
                ms = gpu_ms(lambda: launch_tiles(xd, gd, x, g, ns, 8, steps, d, p, cfg, None, True, True, True))
                log(dict(exp="fp32tiles", T=steps, cfg=list(cfg), ms=ms, cublas=cublas))
            except Exception as e:
                log(dict(exp="fp32tiles", cfg=list(cfg), error=str(e)[:150]))


def main():
    sections = {"split": split_sweep, "stages": stages_sweep, "tf32": tf32_sweep}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="split", help=f"comma list of sections: {', '.join(sections)}")
    args = parser.parse_args()
    out = open(os.path.join(os.environ.get("OUT", "."), "kexp.jsonl"), "a")

    def log(row):
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()

    for name in args.only.split(","):
        sections[name](log)


if __name__ == "__main__":
    main()
