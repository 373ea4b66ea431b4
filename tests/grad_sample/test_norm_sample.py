"""Opacus's per-parameter per-sample norms ``p._norm_sample`` = ‖∇_θ ℓ_b‖ [B], against the float64 microbatch loop.

A plain backward always leaves them (as Opacus's ``GradSampleModuleFastGradientClipping`` does after any backward);
a clipped backward leaves them when the wrapped module's ``per_parameter_norms`` is on, and otherwise removes those
of an earlier backward. Splitting the norms changes nothing the step applies.
"""

import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from flashnorm.grad_sample import FSDPGradSampleModuleFastGradientClipping
from flashnorm.utils.fsdp_utils import FSDP2Wrapper
from tests.conftest import CLIPPING_MODES, TOLERANCES
from tests.grad_sample.test_reuse import MODELS as REUSE_MODELS, _inputs as reuse_inputs
from tests.oracle import microbatch_reference
from tests.zoo import KINDS, build

RTOL, ATOL = TOLERANCES["fp64"]
#: (mode, forced norm method): the planner's choice, and each method the modes' rules have.
METHODS = [(mode, None) for mode in CLIPPING_MODES] + [
    ("ghost", "per_sample"), ("flash", "flash"), ("flash_fuse", "gram"), ("flash_fuse", "per_sample"),
]
#: Zoo kinds, and reused parameters: a layer called three times, one weight tied between an embedding and the head
#: (the cross term), two Linears sharing a weight, a DP LSTM (its cells called per time step).
CASES = list(KINDS) + ["twice_called", "tied_lm", "tied_linears", "dp_lstm"]


def _case(case, batch):
    torch.manual_seed(0)
    if case in REUSE_MODELS:
        model = REUSE_MODELS[case]().double()
        return model, reuse_inputs(case, batch, 5), torch.randint(0, 3, (batch,))
    model, x, y = build(case, 5, batch)
    return model.double(), (x.double() if x.is_floating_point() else x), y


def _make_private(model, x, y, mode, reduction="sum", clip=1e-2):
    return FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=x.shape[0]),
        criterion=nn.CrossEntropyLoss(reduction=reduction), noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode=mode, loss_reduction=reduction,
    )


def _oracle(model, x, y, clip=1e-2):
    return microbatch_reference(model, x, y, lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum"), clip)


def _assert_opacus_norms(model, oracle):
    """Every trainable parameter's ``_norm_sample`` is ‖∇_θ ℓ_b‖ [B] of the oracle."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p._norm_sample.shape == oracle.norms.shape, name
            torch.testing.assert_close(p._norm_sample.double(), oracle.param_norms[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode,method", METHODS, ids=[f"{m}-{f or 'auto'}" for m, f in METHODS])
def test_a_clipped_backward_sets_per_parameter_norms_when_asked(mode, method, case, monkeypatch):
    """With ``per_parameter_norms`` on, the DP loss's backward leaves each parameter's norms (weight and bias of a
    Linear apart, packed per-sample gradients per slot, a tied weight's two uses and cross term together), their
    norm over the parameters is ``get_norm_sample()``, and the step still applies the oracle's clipped sum."""
    if method:
        monkeypatch.setenv("FLASHNORM_NORM_METHOD", method)
    model, x, y = _case(case, batch=3)
    oracle = _oracle(model, x, y)
    dp_model, optimizer, criterion, _ = _make_private(model, x, y, mode)
    dp_model.per_parameter_norms = True
    criterion(dp_model(x), y).backward()
    _assert_opacus_norms(model, oracle)
    together = torch.stack([p._norm_sample for p in model.parameters() if p.requires_grad]).norm(dim=0)
    torch.testing.assert_close(together.double(), dp_model.get_norm_sample().double(), rtol=RTOL, atol=ATOL)
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_a_plain_backward_leaves_opacus_per_parameter_norms(mode, batch_size, reduction):
    """A plain backward sets ``p._norm_sample`` = ‖∇_θ ℓ_b‖ whatever the reduction (B ≥ 2: by the end of the
    backward; B = 1, whose forward captures nothing: once ``get_norm_sample()`` is asked). A clipped backward with
    ``per_parameter_norms`` off then removes them; on, it sets its own."""
    model, x, y = _case("layernorm", batch=batch_size)
    oracle = _oracle(model, x, y)
    dp_model, optimizer, criterion, _ = _make_private(model, x, y, mode, reduction)
    nn.functional.cross_entropy(dp_model(x), y, reduction=reduction).backward()
    if batch_size == 1:
        assert not hasattr(model[0].weight, "_norm_sample")
        dp_model.get_norm_sample()
    _assert_opacus_norms(model, oracle)
    optimizer.zero_grad()
    criterion(dp_model(x), y).backward()
    assert not any(hasattr(p, "_norm_sample") for p in model.parameters())
    optimizer.zero_grad()
    dp_model.per_parameter_norms = True
    criterion(dp_model(x), y).backward()
    _assert_opacus_norms(model, oracle)


def test_per_parameter_norms_are_refused_under_fsdp2(one_process_group):
    """FSDP2's rules see the unsharded parameters: no ``p._norm_sample`` of the sharded ones, said when asked."""
    model = FSDP2Wrapper(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), mesh=init_device_mesh("cpu", (1,)))
    module = FSDPGradSampleModuleFastGradientClipping(model)
    with pytest.raises(NotImplementedError, match="not available under FSDP2"):
        module.per_parameter_norms = True
    assert module.per_parameter_norms is False
