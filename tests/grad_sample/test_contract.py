"""Opacus's contract and the errors a misused model gets: the wrapped module behaves like Opacus's (norms after a
plain backward at any B and with either reduction; per-sample losses [B, 1]), and each misuse is refused naming its
real cause, before any parameter changes (replaced parameters, parameters read outside any layer, reentrant
checkpointing, a second backward through the model)."""

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint

from tests.grad_sample.guarantee import (
    MODES, Attempt, C, LinearLoss, adversarial, influence, make_private, oracle, probe, reference, sized,
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_replaced_parameter_is_refused_at_the_next_forward(mode, batch_size):
    """``load_state_dict(sd, assign=True)`` after make_private puts new parameters in the model that the DP
    optimizer does not hold: the next step (after a first one, so that B = 1 takes its hook-free path) refuses."""

    def make(b):
        x, g = b
        model = probe()
        private = make_private(model, mode, clip=C)
        private.criterion(private.model(x), g).backward()
        private.optimizer.step()
        private.optimizer.zero_grad()
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)

        def act():
            private.criterion(private.model(x), g).backward()
            private.optimizer.step()

        return Attempt(model, act)

    assert influence(make, sized(batch_size), refusal="no longer the parameter make_private wrapped") is None


class _ReadsAParameterList(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(4, 3, dtype=torch.float64))])

    def forward(self, x):
        return x @ self.weights[0]


@pytest.mark.parametrize("mode", MODES)
def test_parameters_read_outside_any_layer_name_the_cause(mode):
    x, g = adversarial()[0]
    model = _ReadsAParameterList()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        private = make_private(model, mode, clip=C)
    except (NotImplementedError, ValueError) as err:  # refused when wrapped: fine, if it names the layer
        assert "weights" in str(err)
        return
    with pytest.raises(RuntimeError, match="ran none of its hooked layers"):
        private.criterion(private.model(x), g).backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class _CheckpointedLayers(nn.Module):
    """Every layer inside reentrant activation checkpointing."""

    def __init__(self, inputs_require_grad: bool):
        super().__init__()
        self.body = probe()
        self.inputs_require_grad = inputs_require_grad

    def forward(self, x):
        if self.inputs_require_grad:
            x = x.detach().requires_grad_(True)
        for layer in self.body:
            x = checkpoint.checkpoint(layer, x, use_reentrant=True)
        return x


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("mode", MODES)
def test_reentrant_checkpointing_around_every_layer(mode):
    """Every layer recomputed by reentrant checkpointing (no layer captured in the forward) is exact; where the
    checkpointed inputs do not require grad (no gradient reaches the layers) the step says so."""

    def make(b):
        x, g = b
        model = _CheckpointedLayers(inputs_require_grad=True)
        private = make_private(model, mode, clip=C)

        def act():
            private.criterion(private.model(x), g).backward()
            private.optimizer.step()

        return Attempt(model, act, expected=oracle(private.model, x, g, C))

    assert influence(make, adversarial()) is not None
    x, g = adversarial()[0]
    model = _CheckpointedLayers(inputs_require_grad=False)
    private = make_private(model, mode, clip=C)
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing"):
        private.criterion(private.model(x), g).backward()


@pytest.mark.parametrize("mode", MODES)
def test_an_input_gradient_penalty_before_the_dp_loss_names_the_second_backward(mode):
    x, g = adversarial()[0]
    model = probe()
    private = make_private(model, mode, clip=C)
    x = x.clone().requires_grad_(True)
    out = private.model(x)
    (penalty,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="already back-propagated by a backward other than the DP loss"):
        (private.criterion(out, g) + penalty.square().sum()).backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class _Regression(nn.Module):
    """[B, 4] → [B, 1], for a per-sample loss of shape [B, 1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("mode", MODES)
def test_a_per_sample_loss_of_shape_b_by_one_is_accepted(mode):
    def make(b):
        x, y = b
        model = _Regression()
        private = make_private(model, mode, clip=C, criterion=nn.MSELoss(reduction="sum"))

        def act():
            private.criterion(private.model(x), y).backward()
            private.optimizer.step()

        loss = lambda out, t: nn.functional.mse_loss(out, t, reduction="sum")  # noqa: E731
        return Attempt(model, act, expected=oracle(private.model, x, y, C, loss=loss))

    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 4, generator=gen, dtype=torch.float64), torch.randn(4, 1, generator=gen, dtype=torch.float64)
    y[-1] *= 1e3
    assert influence(make, ((x, y), (x[:-1], y[:-1]))) is not None


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("mode", MODES)
def test_norms_after_a_plain_backward_are_opacus_norms(mode, batch_size, reduction):
    """``get_norm_sample()`` after a plain backward gives ‖∇ℓ_b‖ as Opacus's module does, at B = 1 too, and for a
    ``mean`` loss too (its gradient is each sample's over B)."""
    (x, g), _ = sized(batch_size)
    model = probe()
    private = make_private(model, mode, clip=C, reduction=reduction)
    LinearLoss(reduction)(private.model(x), g).backward()
    expected = reference(private.model, x, g, C).norms
    torch.testing.assert_close(private.model.get_norm_sample(), expected, rtol=1e-10, atol=1e-12)
