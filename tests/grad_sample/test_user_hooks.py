"""The user's own hooks cannot move the norm away from the gradient that is applied: a forward hook that changes a
layer's output (registered before or after ``make_private``) acts downstream of the gradient tap, and a gradient hook
on a parameter is refused by the DP step, naming the parameter, with every parameter unchanged."""

import pytest
import torch

from tests.grad_sample.guarantee import MODES, NEVER, Attempt, C, adversarial, influence, make_private, probe


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("mode", MODES)
def test_a_forward_hook_that_changes_a_layer_output_stays_bounded(mode, when):
    def make(b):
        x, g = b
        model = probe()
        hook = lambda module, inputs, out: 1000 * out + 1  # noqa: E731
        if when == "before":
            model[0].register_forward_hook(hook)
        private = make_private(model, mode, clip=C)
        if when == "after":
            model[0].register_forward_hook(hook)

        def act():
            private.criterion(private.model(x), g).backward()
            private.optimizer.step()

        return Attempt(model, act)

    assert influence(make, adversarial(), refusal=NEVER) is not None


@pytest.mark.parametrize("kind", ["register_hook", "register_post_accumulate_grad_hook"])
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("mode", MODES)
def test_a_gradient_hook_on_a_parameter_is_refused(mode, when, kind):
    def make(b):
        x, g = b
        model = probe()

        def add_hook():
            if kind == "register_hook":
                model[2].weight.register_hook(lambda grad: 1000 * grad)
            else:
                model[2].weight.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(1000))

        if when == "before":
            add_hook()
        private = make_private(model, mode, clip=C)
        if when == "after":
            add_hook()

        def act():
            private.criterion(private.model(x), g).backward()
            private.optimizer.step()

        return Attempt(model, act)

    assert influence(make, adversarial(), refusal=r"Parameter '2\.weight' has a gradient hook") is None
