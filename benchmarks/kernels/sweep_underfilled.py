"""Sweep of the flash-norm shapes below 0.8× cuBLAS in kernels_h200.json: under-filled bf16 (B = 1) tile
configs × T-splits, and the float32/tf32 K-major path split into its copies and its tiles. GPU time of
CUDA-graph replays (no launch overhead). Writes ``$OUT/kexp.jsonl``, one JSON row per measurement::

    PYTHONPATH=. python benchmarks/kernels/sweep_underfilled.py
"""
import json, os, torch, triton
from triton.testing import do_bench_cudagraph
from flashnorm.kernels.flash_norm import FlashConfig, flash_norm_sq_triton, tf32_copy, _tf32_copy_kernel, _launch_tiles
from flashnorm.kernels import flash_norm_sq_reference
out = open(os.path.join(os.environ.get("OUT", "."), "kexp.jsonl"), "w")
def log(r):
    print(json.dumps(r), flush=True); out.write(json.dumps(r) + "\n"); out.flush()
def gt(fn, rep=20):
    fn(); torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median")
torch.backends.cuda.matmul.allow_tf32 = False
for (d, p) in ((1024, 1024), (768, 3072)):
    for T in (4100, 8196):
        x = torch.randn(1, T, d, device="cuda", dtype=torch.bfloat16); g = torch.randn(1, T, p, device="cuda", dtype=torch.bfloat16)
        ref = flash_norm_sq_reference(x.double(), g.double()).item()
        cub = gt(lambda: g.view(-1, p).t() @ x.view(-1, d))
        default = gt(lambda: flash_norm_sq_triton(x, g))
        log(dict(exp="bf16B1", d=d, p=p, T=T, cublas=cub, default=default, ratio=cub / default))
        for cfg in ((64,128,256,8,3),(64,128,128,8,3),(64,128,128,4,3),(64,128,128,4,4),(64,64,128,4,3),(128,128,128,8,3),(64,256,128,8,3),(128,64,128,4,3)):
            c = FlashConfig(*cfg)
            for s in (1, 2, 3, 4, 6, 8):
                try:
                    v = flash_norm_sq_triton(x, g, config=c, splits=s).item()
                    ms = gt(lambda: flash_norm_sq_triton(x, g, config=c, splits=s))
                    log(dict(exp="bf16B1", d=d, p=p, T=T, cfg=cfg, splits=s, ms=ms, ratio=cub / ms, relerr=abs(v - ref) / ref))
                except Exception as e:
                    log(dict(exp="bf16B1", cfg=cfg, splits=s, error=str(e)[:150]))
torch.backends.cuda.matmul.allow_tf32 = True
for T in (4100, 8196):
    d = p = 1024
    x = torch.randn(8, T, d, device="cuda"); g = torch.randn(8, T, p, device="cuda")
    cub = gt(lambda: g.view(-1, p).t() @ x.view(-1, d))
    default = gt(lambda: flash_norm_sq_triton(x, g))
    copy = gt(lambda: (tf32_copy(x, True), tf32_copy(g, True)))
    log(dict(exp="fp32B8", T=T, cublas=cub, default=default, ratio=cub / default, copies=copy))
    n, rows, cols = x.shape
    stride = triton.cdiv(rows, 4) * 4
    buf = torch.empty(n * cols * stride, device="cuda")
    for br, bc, w in ((64,64,4),(128,64,4),(64,128,4),(128,128,8),(32,128,4),(128,32,4),(64,64,8),(128,64,8)):
        ms = gt(lambda: _tf32_copy_kernel[(n * triton.cdiv(rows, br) * triton.cdiv(cols, bc),)](x, buf, rows, cols, stride, TRANSPOSE=True, BLOCK_R=br, BLOCK_C=bc, num_warps=w))
        log(dict(exp="fp32copy", T=T, block=(br, bc, w), ms=ms, gbps=2 * x.numel() * 4 / ms / 1e6))
    from triton.tools.tensor_descriptor import TensorDescriptor
    for cfg in ((32,128,256,8,3),(32,256,128,8,3),(32,128,256,8,4),(64,128,256,8,2),(16,128,256,8,5)):
        c = FlashConfig(*cfg)
        try:
            xd = TensorDescriptor(*tf32_copy(x, transpose=True), block_shape=[c.block_d, c.block_t])
            gd = TensorDescriptor(*tf32_copy(g, transpose=True), block_shape=[c.block_p, c.block_t])
            ns = torch.zeros(8, device="cuda")
            ms = gt(lambda: _launch_tiles(xd, gd, x, g, ns, 8, T, d, p, c, None, True, True, True))
            log(dict(exp="fp32tiles", T=T, cfg=cfg, ms=ms, cublas=cub))
        except Exception as e:
            log(dict(exp="fp32tiles", cfg=cfg, error=str(e)[:150]))
