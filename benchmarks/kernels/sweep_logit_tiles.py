"""Sweep behind the logit kernels' 16-bit tiles (`flashnorm.kernels.linear_cross_entropy.logit_config`).

GPU time (``triton.testing.do_bench``, median) of one pass of each logit kernel over the whole vocabulary, in the
vocabulary blocks the fused head uses at that shape (`head_tiling`), against cuBLAS forming the same logits
(``torch.mm`` with a float32 output) and, for the whole head, Liger-Kernel's fused linear cross-entropy. One JSON
row per measurement in ``$OUT/logit_tiles.jsonl``::

    PYTHONPATH=. python benchmarks/kernels/sweep_logit_tiles.py --rows 32768 --d 2048 --vocab 128256

* ``stats`` / ``grad``: each kernel under every candidate `LogitConfig`, its TFLOP/s (2·rows·V·d per pass) and
  its largest difference from the kernel's default config's output (the tiles change only the float32 summation order);
* ``cublas``: the same logits through cuBLAS, block by block;
* ``head``: forward and backward of the fused head at B = 1 under the default and the fastest configs, and
  Liger-Kernel's loss (when installed) on the same operands.
"""

import argparse
import json
import os
from unittest import mock

import torch
from triton.testing import do_bench

from flashnorm.kernels import linear_cross_entropy as lce
from flashnorm.kernels.linear_cross_entropy import logit_config
from flashnorm.layers.linear_cross_entropy import fused_linear_cross_entropy, head_tiling

#: (block_t, block_v, block_d, group, warps, stages) candidates (block_d is 64 unless named).
CANDIDATES = ((128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4),
              (256, 128, 64, 8, 8, 3), (256, 128, 64, 8, 8, 4), (128, 128, 128, 8, 8, 3), (128, 256, 64, 16, 8, 3),
              (128, 256, 64, 4, 8, 3), (64, 256, 64, 8, 4, 4), (128, 128, 64, 8, 4, 4))  # fmt: skip


def gpu_ms(fn, rep=200):
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def kernel_sweep(log, x, w, y, block):
    rows, d = x.shape
    vocab = w.shape[0]
    tflop = 2 * rows * vocab * d / 1e12
    spans = [(v0, min(vocab, v0 + block)) for v0 in range(0, vocab, block)]
    alpha = torch.ones(rows, device=x.device)
    lse = lce.logit_stats_triton(x, w, None, y, 0, vocab)[0]
    out = torch.empty(rows, block, dtype=x.dtype, device=x.device)
    base = dict(rows=rows, d=d, vocab=vocab, block=block)

    def stats(cfg):
        return [lce.logit_stats_triton(x, w, None, y, v0, v1, config=cfg) for v0, v1 in spans]

    def grad(cfg):
        for v0, v1 in spans:
            lce.logit_grad_block_triton(x, 0, rows, w, None, v0, v1, lse, y, alpha, 1.0, 0.0, out=out[:, : v1 - v0],
                                        config=cfg)
        return out

    def cublas():
        for v0, v1 in spans:
            torch.mm(x, w[v0:v1].T, out_dtype=torch.float32)

    ms = gpu_ms(cublas)
    log(dict(base, exp="cublas", ms=ms, tflops=tflop / ms * 1e3))
    default = {name: logit_config(d, x.dtype, False, name) for name in ("stats", "grad")}
    ref_stats = [torch.stack(s) for s in stats(default["stats"])]
    ref_grad = grad(default["grad"]).clone()
    best = {}
    for name, fn in (("stats", stats), ("grad", grad)):
        for cand in CANDIDATES:
            cfg = default[name]._replace(block_t=cand[0], block_v=cand[1], block_d=cand[2], group=cand[3],
                                   num_warps=cand[4], num_stages=cand[5])
            row = dict(base, exp=name, cfg=list(cfg), default=cfg == default[name])
            try:
                result = fn(cfg)
                if name == "stats":
                    diff = max((torch.stack(s) - r).abs().max().item() for s, r in zip(result, ref_stats))
                else:
                    diff = (result.float() - ref_grad.float()).abs().max().item()
                ms = gpu_ms(lambda: fn(cfg))
                log(dict(row, ms=ms, tflops=tflop / ms * 1e3, max_diff_from_default=diff))
                if name not in best or ms < best[name][0]:
                    best[name] = (ms, cfg)
            except Exception as e:  # a config that does not compile (shared memory): recorded, not fatal
                log(dict(row, error=str(e)[:200]))
    return default, {k: v[1] for k, v in best.items()}


def head_timing(log, x, w, y, default, best):
    rows, d = x.shape
    hidden = x.view(1, rows, d).detach().requires_grad_(True)
    weight = w.detach().requires_grad_(True)
    target = y.view(1, rows)
    base = dict(exp="head", rows=rows, d=d, vocab=w.shape[0])

    def step(fn):
        def run():
            hidden.grad = weight.grad = None
            fn().sum().backward()
        return run

    for label, configs in (("default", default), ("fastest", best)):
        pick = lambda d_, dtype, interpret=False, kernel="stats", _c=configs: _c[kernel]  # noqa: E731
        with mock.patch.object(lce, "logit_config", pick):
            ms = gpu_ms(step(lambda: fused_linear_cross_entropy(hidden, weight, target, shift=True)), rep=100)
        log(dict(base, label=label, cfg={k: list(v) for k, v in configs.items()}, ms=ms))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return
    liger = LigerFusedLinearCrossEntropyLoss()
    shifted = torch.nn.functional.pad(target[:, 1:], (0, 1), value=-100).reshape(-1)
    ms = gpu_ms(step(lambda: liger(weight, hidden.view(rows, d), shifted).view(1)), rep=100)
    log(dict(base, label="liger", ms=ms))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--no-head", action="store_true", help="skip the whole-head timings")
    args = parser.parse_args()
    path = os.path.join(os.environ.get("OUT", "."), "logit_tiles.jsonl")
    handle = open(path, "a")

    def log(row):
        row = dict(row, gpu=torch.cuda.get_device_name())
        print(json.dumps(row), flush=True)
        handle.write(json.dumps(row) + "\n")
        handle.flush()

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.rows, args.d, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(args.vocab, args.d, generator=gen, device="cuda") / args.d**0.5).to(torch.bfloat16)
    y = torch.randint(0, args.vocab, (args.rows,), generator=gen, device="cuda")
    block = head_tiling(1, args.rows, args.vocab, args.d).vocab_block
    default, best = kernel_sweep(log, x, w, y, block)
    if not args.no_head:
        head_timing(log, x, w, y, default, best)


if __name__ == "__main__":
    main()
