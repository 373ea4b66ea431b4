"""FlashNorm's DP optimizer (fused noise tail) against Opacus's optimizer of the clipping modes."""

import pytest
import torch
import torch.nn as nn
from opacus.optimizers import DPOptimizerFastGradientClipping as OpacusOptimizer

from flashnorm.grad_sample.provenance import mark_clipped
from flashnorm.optimizers import DPOptimizerFastGradientClipping


def _pair(reduction):
    torch.manual_seed(0)
    a = nn.Linear(7, 5)
    b = nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    ours = DPOptimizerFastGradientClipping(torch.optim.SGD(a.parameters(), lr=0.3, momentum=0.9), noise_multiplier=0.0,
                                           max_grad_norm=1.0, expected_batch_size=4, loss_reduction=reduction)
    theirs = OpacusOptimizer(torch.optim.SGD(b.parameters(), lr=0.3, momentum=0.9), noise_multiplier=0.0,
                             max_grad_norm=1.0, expected_batch_size=4, loss_reduction=reduction)
    return a, b, ours, theirs


def _set_grads(module, seed):
    """Random gradients, recorded as the clipping workflow's (which the optimizer alone steps on)."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    mark_clipped(module.parameters(), 1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_steps_match_opacus_including_virtual_batches(reduction):
    a, b, ours, theirs = _pair(reduction)
    for step in range(3):
        for virtual in (True, False):  # one skipped (accumulated) micro-step, then a real step
            for module, opt in ((a, ours), (b, theirs)):
                _set_grads(module, seed=10 * step + virtual)
                if virtual:
                    opt.signal_skip_step(True)
                opt.step()
                opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_gradient_is_never_used_twice():
    a, _, ours, _ = _pair("mean")
    _set_grads(a, 1)
    ours.step()
    with pytest.raises(RuntimeError, match="already used by a step"):
        ours.step()
    ours.zero_grad()
    ours.step()  # after zero_grad the (zero) gradient is fresh: a noise-only step is legitimate


def test_noise_in_small_buckets_has_the_right_std(monkeypatch):
    from flashnorm.optimizers import fast_gradient_clipping

    monkeypatch.setattr(fast_gradient_clipping, "NOISE_BUCKET_ELEMENTS", 1000)
    model = nn.Sequential(nn.Linear(200, 150), nn.Linear(150, 200))  # 60k elements, ~60 buckets
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.8,
                                          max_grad_norm=0.5, expected_batch_size=4,
                                          generator=torch.Generator().manual_seed(5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    mark_clipped(model.parameters(), 1)
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert noise.numel() >= 50_000 and (noise != 0).all()
    assert abs(noise.std().item() / (0.8 * 0.5 / 4) - 1) < 0.05


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_noise_and_scale_equal_noise_then_scale(reduction, device, monkeypatch):
    """The fused pass g ← (g + ξ)·s (Triton, interpreted on CPU) gives what add_noise then scale_grad give with the
    same draws, bit for bit in float32, over buckets, a float16 parameter and a virtual (accumulated) step."""
    from flashnorm.optimizers import fast_gradient_clipping

    monkeypatch.setattr(fast_gradient_clipping, "NOISE_BUCKET_ELEMENTS", 500)
    results = []
    for fused in (True, False):
        monkeypatch.setenv("FLASHNORM_BACKEND", "triton" if fused else "torch")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 7)).to(device)
        model[1].half()
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.7,
                                              max_grad_norm=0.5, expected_batch_size=4, loss_reduction=reduction,
                                              generator=torch.Generator(device=device).manual_seed(3))
        opt.fuses_noise_and_scale = fused
        for virtual in (True, False):
            gen = torch.Generator().manual_seed(int(virtual))
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype)
            mark_clipped(model.parameters(), 1)
            if virtual:
                opt.signal_skip_step(True)
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for fused, unfused in zip(*results):
        assert torch.equal(fused, unfused)


def test_the_parameter_list_is_built_once_per_step_and_follows_requires_grad():
    """One list for the step; a parameter frozen between steps is dropped from the next one (no noise)."""
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2))
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                                          max_grad_norm=1.0, expected_batch_size=2)
    _set_grads(model, 0)
    opt.step()
    opt.zero_grad()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    _set_grads(model, 1)
    model[0].weight.grad = None
    opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert len(opt.params) == 3
