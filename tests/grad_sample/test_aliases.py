"""Parameter aliases (`flashnorm.grad_sample.aliases`): invisible to the model and to plain autograd, rebuilt when
a parameter's data is replaced, and never left in place when a layer's forward raises."""

import pytest
import torch
import torch.nn as nn

from tests.grad_sample.guarantee import MODES, LinearLoss, batch, make_private, oracle


class _Raising(nn.Module):
    """Linear → Linear whose second layer raises when ``fail`` is set."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()
        self.fail = False

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _registered(model):
    return [(m, name, p) for m in model.modules() for name, p in m._parameters.items()]


def _flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", MODES)
def test_registrations_hold_the_parameters_outside_a_layer_forward_even_after_it_raised(mode):
    model = _Raising()
    params = list(model.parameters())
    private = make_private(model, mode, clip=1.0)

    def fail(module, inputs):
        if model.fail:
            raise RuntimeError("boom")

    model.second.register_forward_pre_hook(fail)
    x, g = batch(4, seed=1)
    private.criterion(private.model(x), g).backward()
    assert [p for _, _, p in _registered(model)] == params
    model.fail = True
    for training in (True, False):  # a capturing forward, and an evaluation one
        private.model.train(training)
        with pytest.raises(RuntimeError, match="boom"):
            private.model(x)
        assert all(m._parameters[name] is p for m, name, p in _registered(model)) and list(model.parameters()) == params
        assert model.second.weight is params[2]


@pytest.mark.parametrize("mode", MODES)
def test_a_plain_backward_leaves_the_plain_gradient(mode):
    """Gradients that reach an alias are moved into p.grad: a plain loss.backward() through the wrapped model leaves
    exactly what it leaves on the unwrapped model, the parameters' own hooks applied (the optimizer still refuses
    them: not clipped)."""
    model = _Raising()
    reference = _Raising()
    for m in (model, reference):  # a hook of the user's own on a parameter runs as in plain autograd
        m.first.weight.register_hook(lambda grad: 2 * grad)
    x, g = batch(4, seed=1)
    LinearLoss()(reference(x), g).backward()
    private = make_private(model, mode, clip=1.0)
    LinearLoss()(private.model(x), g).backward()
    torch.testing.assert_close(_flat_grads(model), _flat_grads(reference), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_replaced_parameter_data_is_followed(mode):
    """``p.data = ...`` (or a dtype/device move) after a step: the next step clips and applies the new values."""
    model = _Raising()
    private = make_private(model, mode, clip=0.5)
    x, g = batch(4, seed=2)
    private.criterion(private.model(x), g).backward()
    private.optimizer.step()
    private.optimizer.zero_grad()
    model.first.weight.data = 3 * model.first.weight.data.clone()
    x, g = batch(4, seed=3)
    expected = oracle(private.model, x, g, 0.5)
    private.criterion(private.model(x), g).backward()
    torch.testing.assert_close(_flat_grads(model), expected, rtol=1e-10, atol=1e-12)
