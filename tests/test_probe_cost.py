"""benchmarks/probe_cost.py times what it says: each round runs the wrapped model's capturing forward without the
probe, then the sample-independence probe's perturbed forward and its comparison."""

import torch

from benchmarks import probe_cost
from flashnorm.grad_sample import independence


def test_each_round_times_one_capturing_forward_one_probe_and_one_comparison(monkeypatch):
    calls = []
    start, compare = independence.IndependenceProbe.start.__func__, independence.IndependenceProbe.compare

    def counted_start(cls, module, *args, **kwargs):
        calls.append(("start", args[1]))
        return start(cls, module, *args, **kwargs)

    def counted_compare(self, output):
        calls.append(("compare", output.shape[0]))
        return compare(self, output)

    monkeypatch.setattr(independence.IndependenceProbe, "start", classmethod(counted_start))
    monkeypatch.setattr(independence.IndependenceProbe, "compare", counted_compare)
    result = probe_cost.probe_times("flash_fuse", batch=3, seq=4, smoke=True, device=torch.device("cpu"), repeats=2)
    # two warm-up rounds and two timed ones; the wrapped forwards themselves never probe (probe_pending is off)
    assert calls == [("start", 3), ("compare", 3)] * 4
    assert set(result) == {"batch", "seq", "forward_ms", "probe_forward_ms", "compare_ms"}
