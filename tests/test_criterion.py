"""The DP criterion of the clipping modes (flashnorm/criterion.py; Opacus's import path
flashnorm.utils.fast_gradient_clipping_utils re-exports it): per-sample losses whose ``backward()`` runs the
clipping workflow, the sequence as privacy unit with ``shape=(B, T, V)``, and loss arithmetic that keeps FlashNorm's
DP tensor."""

import pytest
import torch
import torch.nn as nn

from flashnorm.criterion import DPLossFastGradientClipping, DPTensorFastGradientClipping
from tests.conftest import CLIPPING_MODES
from tests.oracle import microbatch_reference
from tests.test_privacy_engine import private, small_model


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_token_level_loss_privacy_unit_is_the_sequence(mode, reduction):
    vocab, batch, steps = 7, 3, 37
    model = nn.Sequential(nn.Embedding(vocab, 4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, vocab))
    x, y = torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))
    clip = 0.05

    def sample_loss(logits, target):
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), reduction=reduction)

    oracle = microbatch_reference(model, x, y, sample_loss, clip)
    _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, x=x, y=y, clip=clip, reduction=reduction, n=batch,
                                                batch_size=batch)
    logits = dp_model(x)
    criterion(logits.reshape(-1, vocab), y.reshape(-1), shape=(batch, steps, vocab)).backward()
    torch.testing.assert_close(dp_model.get_norm_sample().double(), oracle.norms, rtol=1e-5, atol=1e-7)
    dp_opt.step()
    scale = batch if reduction == "mean" else 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), oracle.clipped_sum[name] / scale, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_loss_arithmetic_keeps_the_clipping_workflow(mode):
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    grads = []
    for factor in (1.0, 2.0):
        torch.manual_seed(0)
        model = small_model()
        _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, x=x, y=y, clip=1e10, n=4)
        loss = criterion(dp_model(x), y) * factor
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], 2 * grads[0])


#: Each arithmetic op of a DP loss and the factor it puts on the gradient.
OPS = {
    "mul": (lambda loss: loss * 2.0, 2.0),
    "rmul": (lambda loss: 2.0 * loss, 2.0),
    "truediv": (lambda loss: loss / 4.0, 0.25),
    "add": (lambda loss: loss + loss, 2.0),
    "radd": (lambda loss: 1.0 + loss, 1.0),
    "sub": (lambda loss: loss - 0.5, 1.0),
    "rsub": (lambda loss: 1.0 - loss, -1.0),
    "neg": (lambda loss: -loss, -1.0),
}


@pytest.mark.parametrize("op", OPS)
def test_every_loss_op_returns_flashnorm_dp_tensor_that_the_optimizer_steps_on(op):
    """The criterion returns FlashNorm's DP tensor and so does every arithmetic op on it: the result's
    ``backward()`` runs the clipping workflow (clipping inactive: the op's factor times the loss's gradient),
    whose gradients ``optimizer.step()`` accepts."""
    apply, factor = OPS[op]
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    grads = []
    for transform in (lambda loss: loss, apply):
        torch.manual_seed(0)
        model = small_model()
        _, dp_model, dp_opt, criterion, _ = private(model, mode="flash_fuse", x=x, y=y, clip=1e10, n=4)
        assert isinstance(criterion, DPLossFastGradientClipping)
        loss = transform(criterion(dp_model(x), y))
        assert isinstance(loss, DPTensorFastGradientClipping), type(loss)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        dp_opt.step()
    torch.testing.assert_close(grads[1], factor * grads[0])
