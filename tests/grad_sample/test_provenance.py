"""Which gradients the workflow wrote (flashnorm/grad_sample/provenance.py): mark_clipped records each p.grad with its
number of clipped passes, clipped_iterations reads it back only while p.grad is that very tensor unmodified (an
in-place edit, a replacement or an optimizer step loses it), and take_pending_clipped_sum takes a sum still waiting
for its step only when every gradient is one of the same number of passes."""

import gc

import torch
import torch.nn as nn

from flashnorm.grad_sample import GradSampleModuleFastGradientClippingFuse
from flashnorm.grad_sample.provenance import clipped_iterations, mark_clipped, take_pending_clipped_sum
from tests.grad_sample.direct import wrap


def _params(n=3, graded=None):
    """``n`` parameters, those in ``graded`` (default all) with a gradient."""
    graded = range(n) if graded is None else graded
    params = [nn.Parameter(torch.zeros(2, 3)) for _ in range(n)]
    for i in graded:
        params[i].grad = torch.randn(2, 3)
    return params


def test_a_marked_gradient_reads_back_its_count_until_it_changes():
    a, b, c = params = _params(graded=(0, 1))
    assert [clipped_iterations(p) for p in params] == [None, None, None], "nothing marked yet"
    mark_clipped(params, 2)
    assert [clipped_iterations(p) for p in params] == [2, 2, None], "a missing gradient is not marked"
    a.grad.mul_(2.0)
    with torch.no_grad():
        b.grad += 1.0
    assert clipped_iterations(a) is None and clipped_iterations(b) is None, "edited in place"
    mark_clipped(params, 1)
    assert clipped_iterations(a) == 1 and clipped_iterations(b) == 1, "marked again as it is now"
    a.grad = a.grad.clone()
    b.grad = None
    assert clipped_iterations(a) is None and clipped_iterations(b) is None, "replaced, removed"


def test_the_record_does_not_keep_the_gradient_alive():
    """The record holds a weak reference: once the marked tensor is freed, no new tensor matches it."""
    (p,) = _params(1)
    mark_clipped([p], 1)
    p.grad = None
    gc.collect()
    p.grad = torch.zeros(2, 3)
    assert clipped_iterations(p) is None


def test_the_workflow_marks_each_backward_and_the_optimizer_step_uses_it():
    """Through the module: one DP backward marks 1, a second before the step (gradient accumulation) 2; the optimizer
    step uses them (no record matches afterwards)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    gsm, opt, criterion = wrap(GradSampleModuleFastGradientClippingFuse, model)
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    for passes in (1, 2):
        criterion(gsm(x), y).backward()
        assert [clipped_iterations(p) for p in model.parameters()] == [passes] * 4
    opt.step()
    assert [clipped_iterations(p) for p in model.parameters()] == [None] * 4


def test_a_pending_sum_is_taken_when_every_gradient_has_one_count():
    params = _params(4, graded=(0, 1, 3))  # the third frozen in the earlier passes: no gradient
    grads = [p.grad for p in params]
    mark_clipped(params, 3)
    prior, count = take_pending_clipped_sum(params)
    assert count == 3 and all(p.grad is None for p in params)
    assert len(prior) == 4 and all(got is want for got, want in zip(prior, grads))


def test_nothing_is_taken_from_mixed_or_unmarked_gradients():
    for setup in (
        lambda ps: (mark_clipped(ps[:2], 1), mark_clipped(ps[2:], 2)),  # two counts
        lambda ps: mark_clipped(ps[:2], 1),  # one gradient not written by the workflow
        lambda ps: (mark_clipped(ps, 1), ps[0].grad.add_(1.0)),  # one edited since
        lambda ps: None,  # none marked
    ):
        params = _params()
        setup(params)
        grads = [p.grad for p in params]
        assert take_pending_clipped_sum(params) == (None, 0)
        assert all(p.grad is g for p, g in zip(params, grads)), "left where they were"
    assert take_pending_clipped_sum(_params(2, graded=())) == (None, 0), "no gradient at all"
