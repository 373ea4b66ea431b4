"""σ and C are fixed from the first clipped backward pass of a logical step until the ``optimizer.step()`` that applies
it, in every clipping mode.

Written as an attacker would (`tests.grad_sample.guarantee`, noise 0): the adversarial sample is clipped with
C = 10, then C is lowered to 1 (between the backward and the step, between micro-batches, across a skipped step
or ``BatchMemoryManager``'s virtual steps) so that the noise would be sized for C = 1 while the sample counts 10.
Every such step is refused with the parameters unchanged. Changes between logical steps, or after the accumulated
gradients were discarded, take effect exactly (float64 oracle).
"""

import pytest
import torch

from flashnorm.utils.privacy_parameters import PrivacyParameters
from tests.grad_sample.guarantee import (
    C, MODES, Attempt, adversarial, batch, influence, make_private, oracle, probe, run, step, step_on,
    virtual_steps,
)

#: The bound the adversarial sample is clipped with before C is lowered to the probe's C = 1.
HIGH = 10 * C
CHANGED = r"max_grad_norm from 10\.0 to 1\.0 since the first clipped backward pass"


def _backward(private, x, g):
    private.criterion(private.model(x), g).backward()


def _after_backward(mode, b, *, clip, sigma=0.0, **changed):
    """The probe made private (``clip``, ``sigma``), one clipped backward on ``b``, then ``changed`` set on the
    optimizer (its ``max_grad_norm``, ``noise_multiplier``)."""
    private = make_private(probe(), mode, clip=clip, sigma=sigma)
    _backward(private, *b)
    for name, value in changed.items():
        setattr(private.optimizer, name, value)
    return private


def _lowered_then_step(private, b):
    """C lowered to the probe's C, then one step on ``b``: it must apply the oracle's clipped sum at C exactly."""
    private.optimizer.max_grad_norm = C
    return step_on(private, *b, exact_at=C)


# -- a change inside a logical step is refused ------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_c_lowered_between_backward_and_step_is_refused(mode):
    def make(b):
        private = _after_backward(mode, b, clip=HIGH, max_grad_norm=C)
        return Attempt(private.module, private.optimizer.step)

    assert influence(make, adversarial(), clip=C, refusal="optimizer.step\\(\\) refused: " + CHANGED) is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adversary_first", [True, False])
def test_c_lowered_between_micro_batches_is_refused(mode, adversary_first):
    """Two ``backward()`` calls before one ``step()``; the second micro-batch's backward refuses, before it
    changes anything, and so does the step."""
    def make(b):
        model = probe()
        private = make_private(model, mode, clip=HIGH)
        other = batch(3, seed=5)
        first, second = (b, other) if adversary_first else (other, b)
        _backward(private, *first)
        private.optimizer.max_grad_norm = C

        def act():
            before = [p.grad.clone() for p in model.parameters()]
            with pytest.raises(RuntimeError, match="this clipped backward pass refused: " + CHANGED):
                _backward(private, *second)
            for p, g in zip(model.parameters(), before):  # the first micro-batch's sum is kept as it was
                assert torch.equal(p.grad, g)
            private.optimizer.step()
        return Attempt(model, act)

    assert influence(make, adversarial(), clip=C, refusal=CHANGED) is None


@pytest.mark.parametrize("mode", MODES)
def test_c_lowered_across_a_skipped_step_is_refused(mode):
    """``signal_skip_step``: the first micro-batch (with the adversarial sample) is accumulated by a skipped step
    with C = 10; lowering C before the second micro-batch is refused, even after ``zero_grad`` (which keeps the
    accumulated sums after a skipped step)."""
    def make(b):
        model = probe()
        private = make_private(model, mode, clip=HIGH)
        private.optimizer.signal_skip_step(True)
        step(private, *b)  # skipped: accumulated
        private.optimizer.zero_grad()
        private.optimizer.max_grad_norm = C
        return Attempt(model, lambda: step(private, *batch(3, seed=5)))

    assert influence(make, adversarial(), clip=C, refusal=CHANGED) is None


@pytest.mark.parametrize("mode", MODES)
def test_c_lowered_inside_a_batch_memory_manager_loop_is_refused(mode):
    """One logical batch in physical batches of 3 and 1 (virtual steps); C lowered after the first."""
    def make(b):
        x, g = b
        model = probe()
        private = make_private(model, mode, clip=HIGH, data=(x, g), batch_size=len(x))

        def lower():
            private.optimizer.max_grad_norm = C
        return Attempt(model, lambda: virtual_steps(private, max_physical_batch_size=3, between=lower))

    assert influence(make, adversarial(), clip=C, refusal=CHANGED) is None


@pytest.mark.parametrize("mode", MODES)
def test_sigma_changed_between_backward_and_step_is_refused(mode):
    private = _after_backward(mode, adversarial()[0], clip=C, sigma=1.0, noise_multiplier=0.0)
    assert run(Attempt(private.module, private.optimizer.step), r"noise_multiplier from 1\.0 to 0\.0") is None
    assert private.engine.accountant.history == []


@pytest.mark.parametrize("mode", MODES)
def test_c_set_back_before_the_step_is_exact(mode):
    """A refused step leaves the gradients: setting C back to the value they were clipped with lets it run."""
    def make(b):
        private = _after_backward(mode, b, clip=C, max_grad_norm=HIGH)
        with pytest.raises(RuntimeError, match="max_grad_norm from 1.0 to 10.0"):
            private.optimizer.step()
        private.optimizer.max_grad_norm = C
        return Attempt(private.module, private.optimizer.step, expected=oracle(private.model, *b, C))

    assert influence(make, adversarial()) is not None


# -- changes between logical steps, or after the gradients were discarded, apply ------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("discard", ["zero_grad", "set_to_none", "step"])
def test_c_changed_once_the_accumulated_gradients_are_gone_is_applied(mode, discard):
    """After ``zero_grad()``, ``p.grad = None`` or a real step, a new C is the bound of the next step, exactly."""
    def make(b):
        private = make_private(probe(), mode, clip=HIGH)
        step(private, *batch(3, seed=5)) if discard == "step" else _backward(private, *batch(3, seed=5))
        if discard == "set_to_none":
            for p in private.module.parameters():
                p.grad = None
        else:
            private.optimizer.zero_grad()
        return _lowered_then_step(private, b)

    assert influence(make, adversarial()) is not None


@pytest.mark.parametrize("mode", MODES)
def test_c_changed_after_a_refused_backward_is_applied(mode):
    """A backward that raised (its forward captured nothing) accumulated nothing: C may change after it."""
    def make(b):
        private = make_private(probe(), mode, clip=HIGH)
        private.model.eval()
        loss = private.criterion(private.model(b[0]), b[1])
        with pytest.raises(RuntimeError, match="No captured forward pass"):
            loss.backward()
        private.model.train()
        return _lowered_then_step(private, b)

    assert influence(make, adversarial()) is not None


@pytest.mark.parametrize("mode", MODES)
def test_a_noise_only_step_after_a_change_runs(mode):
    """Gradients discarded, C changed, then a step without any backward: noise alone, sized for the new C."""
    model = probe()
    private = make_private(model, mode, clip=HIGH, sigma=1.0)
    _backward(private, *batch(3, seed=5))
    private.optimizer.zero_grad()
    private.optimizer.max_grad_norm = C
    private.optimizer.step()
    assert private.engine.accountant.history == [(1.0, 0.5, 1)]
    assert private.optimizer.privacy.pinned is None


# -- PrivacyParameters on its own -------------------------------------------------------------------------------
def test_parameters_without_an_optimizer_do_not_pin():
    """A grad-sample module used without a DP optimizer (no step to release a pin) reads C as it is."""
    privacy = PrivacyParameters(0.0, 1.0)
    assert privacy.pin() == 1.0
    privacy.max_grad_norm = 2.0
    assert privacy.pin() == 2.0
    assert privacy.pinned is None


def test_pin_check_release():
    waiting = [True]
    privacy = PrivacyParameters(0.5, 1.0)
    privacy.attach_step(lambda: waiting[0])
    assert privacy.pin() == 1.0 and privacy.pinned == (0.5, 1.0)
    privacy.max_grad_norm = 3.0
    with pytest.raises(RuntimeError, match=r"this clipped backward pass refused: max_grad_norm from 1\.0 to 3\.0"):
        privacy.pin()
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) refused"):
        privacy.check_for_step()
    privacy.max_grad_norm = float("nan")  # an invalid value is named as such first
    with pytest.raises(ValueError, match="max_grad_norm=nan"):
        privacy.pin()
    privacy.max_grad_norm = 1.0
    privacy.check_for_step()
    privacy.release()
    privacy.noise_multiplier = 2.0
    assert privacy.pin() == 1.0 and privacy.pinned == (2.0, 1.0)
    waiting[0] = False  # the gradients were discarded: the pin is stale
    privacy.noise_multiplier = 3.0
    privacy.check_for_step()
    assert privacy.pinned is None


def test_the_pin_does_not_keep_the_optimizer_alive():
    import gc
    import weakref

    model = probe()
    private = make_private(model, "flash_fuse", clip=C)
    privacy, ref = private.optimizer.privacy, weakref.ref(private.optimizer)
    private.criterion.optimizer = None
    del private
    gc.collect()
    assert ref() is None
    assert privacy.pin() == C  # no optimizer left: nothing to pin for


def test_a_copy_of_the_wrapped_model_holds_the_values_not_the_pin():
    import copy

    private = make_private(probe(), "flash_fuse", clip=C)
    _backward(private, *batch(3, seed=5))
    twin = copy.deepcopy(private.model)
    assert (twin.privacy.noise_multiplier, twin.privacy.max_grad_norm, twin.privacy.pinned) == (0.0, C, None)
    assert private.optimizer.privacy.pinned == (0.0, C)
