"""The loss check (flashnorm/grad_sample/loss_check.py: FiniteLossCheck) on CPU: finite losses pass, a NaN or ±inf
anywhere fails, the verdict is the loss's when the check was made, and a deep copy is the check itself."""

import copy

import pytest
import torch

from flashnorm.grad_sample.loss_check import NON_FINITE_LOSS, FiniteLossCheck


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_finite_losses_pass_and_any_nan_or_inf_fails(dtype):
    loss = torch.tensor([0.5, -3.0, 1e30, 0.0], dtype=dtype)
    assert FiniteLossCheck(loss).result() is True
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in range(loss.numel()):
            poisoned = loss.clone()
            poisoned[i] = bad
            assert FiniteLossCheck(poisoned).result() is False, (bad, i)


def test_an_empty_batch_passes():
    assert FiniteLossCheck(torch.zeros(0)).result() is True


def test_the_verdict_is_the_loss_at_the_check():
    """The flag is computed when the check is made (behind the forward), not when it is read."""
    loss = torch.ones(3, requires_grad=True) * 2.0
    check = FiniteLossCheck(loss)
    with torch.no_grad():
        loss[1] = float("nan")
    assert check.result() is True
    assert FiniteLossCheck(loss).result() is False


def test_a_deep_copy_is_the_same_check():
    check = FiniteLossCheck(torch.tensor([float("nan")]))
    assert copy.deepcopy(check) is check
    holder = copy.deepcopy({"check": check, "other": [1]})
    assert holder["check"] is check and holder["check"].result() is False


def test_the_refusal_message_names_the_cause_and_the_fixes():
    for words in ("not finite", "NaN or inf", "discarded", "no parameter changed", "loss scaler"):
        assert words in NON_FINITE_LOSS
