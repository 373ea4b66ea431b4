"""What the sample-independence probe costs (`flashnorm.grad_sample.independence`).

    python -m benchmarks.probe_cost --device cpu --smoke --shapes 8x64,16x128

The probe runs once per wrapped module, at its first capturing forward with B ≥ 2: one extra forward of that batch
with sample 0 replaced by another (the layers' hooks off, as the wrapped module runs it), then a comparison of the
two outputs. This times, per (B, T), the median of each part beside the wrapped model's capturing forward that every
step runs: the probe's forward (`start`) and the
comparison (`compare`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn as nn

from flashnorm import FlashNormPrivacyEngine
from flashnorm.grad_sample.independence import IndependenceProbe
from flashnorm.utils.export import unwrap_model

from .harness import _dummy_loader, quiet_warnings
from .models import build_model, make_batch


def probe_times(mode: str, batch: int, seq: int, smoke: bool, device: torch.device, repeats: int) -> dict:
    """Median ms over ``repeats`` (after two warm-up rounds) of the wrapped GPT-2's capturing forward, the probe's
    forward and its comparison."""
    model = build_model("gpt2", seq_len=seq, smoke=smoke, device=device)
    inputs, _ = make_batch("gpt2", batch=batch, seq_len=seq, smoke=smoke, device=device)
    dp_model, _, _, _ = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        data_loader=_dummy_loader(batch), noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
        poisson_sampling=False,
    )
    dp_model.probe_pending = False  # the wrapped forward alone; the probe's parts are timed below

    def timed(fn, *args):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, (time.perf_counter() - t0) * 1e3

    times = {"forward_ms": [], "probe_forward_ms": [], "compare_ms": []}
    for i in range(repeats + 2):
        out, forward = timed(dp_model, inputs)
        dp_model.disable_hooks()
        try:
            probe, probe_forward = timed(IndependenceProbe.start, unwrap_model(dp_model), 0, batch, (inputs,), {},
                                         dp_model.hooks.leading_batch_size)
        finally:
            dp_model.enable_hooks()
        _, compare = timed(probe.compare, out)
        del out, probe
        if i >= 2:
            for key, value in zip(times, (forward, probe_forward, compare)):
                times[key].append(value)
    return {"batch": batch, "seq": seq, **{key: statistics.median(values) for key, values in times.items()}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="flash_fuse", choices=("flash_fuse", "flash", "ghost"))
    p.add_argument("--shapes", default="8x64,16x128", help="comma list of BxT (default 8x64,16x128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny GPT-2 (2 layers, width 64)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    quiet_warnings()
    device = torch.device(args.device)
    for shape in args.shapes.split(","):
        batch, seq = (int(n) for n in shape.lower().split("x"))
        r = probe_times(args.mode, batch, seq, args.smoke, device, args.repeats)
        print(f"B={batch}, T={seq}: capturing forward {r['forward_ms']:.2f} ms; the probe (once per wrapped module): "
              f"its forward {r['probe_forward_ms']:.2f} ms, the comparison {r['compare_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
