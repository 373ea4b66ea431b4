"""The property test of the guarantee: zoo models × misuses × modes × reductions, drawn at random. Every misused
step keeps the last sample's influence ≤ C (and applies the float64 oracle's clipped sum exactly), or raises a
clear error with every parameter bit-identical (`tests.grad_sample.guarantee`); a supported step is never
refused. The hand-written rows of each guarantee are in test_guarantees.py.
"""

import random

import pytest
import torch
import torch.nn as nn

from tests.grad_sample.guarantee import (
    MODES, NEVER, NO_CAPTURE, NOT_CLIPPED, Attempt, cross_entropy_sum, influence, make_private, oracle, step,
    without_last,
)
from tests.oracle import microbatch_reference
from tests.zoo import KINDS, build

MISUSES = ("eval", "hooks_disabled", "plain_backward", "second_backward", "unfreeze", "freeze", "accumulation",
           "skip_step", "invalid_clip", "invalid_sigma", "outside_read")
ZOO_CLIP = 1e-3  # below every zoo sample's gradient norm: an unclipped sample shows


def _zoo_case(kind, misuse, mode, reduction):
    """``make(batch)`` for a float64 zoo model of ``kind`` misused as ``misuse`` (the property test's scenario)."""
    def make(batch):
        x, y = batch
        torch.manual_seed(5)
        model, _, _ = build(kind, 4, batch=1)
        model = model.double()
        head = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))][-1]
        if misuse == "unfreeze":
            head.requires_grad_(False)
        clip = float("inf") if misuse == "invalid_clip" else ZOO_CLIP
        sigma = float("nan") if misuse == "invalid_sigma" else 0.0
        private = make_private(model, mode, clip=clip, sigma=sigma, reduction=reduction,
                               criterion=nn.CrossEntropyLoss(reduction=reduction))
        warm_x, warm_y = _zoo_warm(kind, 4)
        scale = 4.0 if reduction == "mean" else 1.0  # mean: the step divides by the expected batch size

        def expected():
            return oracle(private.model, x, y, ZOO_CLIP, loss=cross_entropy_sum)

        if misuse in ("eval", "hooks_disabled", "unfreeze", "freeze", "outside_read"):
            step(private, warm_x, warm_y)
            private.optimizer.zero_grad()
            if misuse == "outside_read":  # from now on the output also reads the head's first parameter directly
                weight = next(head.parameters())
                model.register_forward_hook(lambda module, inputs, out: out + weight.sum())
            elif misuse == "eval":
                private.model.eval()
            elif misuse == "hooks_disabled":
                private.model.disable_hooks()
            elif misuse == "unfreeze":
                head.requires_grad_(True)
            else:
                head.requires_grad_(False)
            return Attempt(model, lambda: step(private, x, y), scale=scale, expected=expected())
        if misuse == "plain_backward":
            def act():
                nn.CrossEntropyLoss(reduction=reduction)(private.model(x), y).backward()
                private.optimizer.step()
            return Attempt(model, act)
        if misuse == "second_backward":
            def act():
                loss = private.criterion(private.model(x), y)
                loss.backward()
                private.optimizer.zero_grad()
                loss.backward()
                private.optimizer.step()
            return Attempt(model, act)
        if misuse == "accumulation":
            total = expected() + oracle(private.model, warm_x, warm_y, ZOO_CLIP, loss=cross_entropy_sum)
            private.criterion(private.model(warm_x), warm_y).backward()
            scale = 2 * scale if reduction == "mean" else 1.0  # mean: divided by k × the expected batch size
            return Attempt(model, lambda: step(private, x, y), scale=scale, expected=total)
        # skip_step
        total = expected() + oracle(private.model, warm_x, warm_y, ZOO_CLIP, loss=cross_entropy_sum)
        private.optimizer.signal_skip_step(True)
        step(private, warm_x, warm_y)
        private.optimizer.zero_grad()
        return Attempt(model, lambda: step(private, x, y), scale=scale, expected=total)

    return make


def _zoo_warm(kind, n):
    torch.manual_seed(6)
    _, x, y = build(kind, 4, batch=n)
    return (x.double() if x.is_floating_point() else x), y


def _zoo_cases(count=80, seed=18):
    rng = random.Random(seed)
    return [(rng.choice(KINDS), rng.choice(MISUSES), rng.choice(MODES), rng.choice(("sum", "mean")))
            for _ in range(count)]


@pytest.mark.parametrize("kind", KINDS)
def test_zoo_samples_are_clipped(kind):
    """ZOO_CLIP binds on every sample: an unclipped one would show in the influence."""
    torch.manual_seed(7)
    model, x, y = build(kind, 4, batch=4)
    norms = microbatch_reference(model, x, y, cross_entropy_sum, ZOO_CLIP).norms
    assert norms.min() > 10 * ZOO_CLIP


@pytest.mark.parametrize("kind,misuse,mode,reduction", _zoo_cases())
def test_zoo_misuse_is_bounded_or_refused(kind, misuse, mode, reduction):
    torch.manual_seed(7)
    _, x, y = build(kind, 4, batch=4)
    x = x.double() if x.is_floating_point() else x
    make = _zoo_case(kind, misuse, mode, reduction)
    refusal = {"eval": NO_CAPTURE, "hooks_disabled": NO_CAPTURE, "second_backward": NO_CAPTURE,
               "plain_backward": NOT_CLIPPED, "invalid_clip": "max_grad_norm", "outside_read": "outside that layer",
               "invalid_sigma": "noise_multiplier"}.get(misuse, NEVER)
    if misuse.startswith("invalid"):
        with pytest.raises(ValueError, match=refusal):
            make((x, y))
        return
    result = influence(make, without_last(x, y), clip=ZOO_CLIP, refusal=refusal)
    assert (result is None) == (refusal != NEVER), "refused a supported step, or stepped on a misused one"
