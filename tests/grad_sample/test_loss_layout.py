"""The clipping coefficient c_b reaches the model's batch row b whatever order or layout the loss puts the samples
in: a loss over flipped rows, and the README's token-level loss with ``batch_first=False`` (logits [T, B, V] flattened
time-major), are exact against the float64 oracle in every mode, and a sample's influence stays ≤ C(1 + 10⁻³)."""

import pytest
import torch

from tests.grad_sample.guarantee import (
    MODES, Attempt, C, adversarial, influence, make_private, oracle, probe, sample_loss,
)


@pytest.mark.parametrize("mode", MODES)
def test_a_loss_over_permuted_rows_is_clipped_per_model_row(mode):
    def make(b):
        x, g = b
        model = probe()
        private = make_private(model, mode, clip=C)

        def act():
            private.criterion(private.model(x).flip(0), g.flip(0)).backward()
            private.optimizer.step()

        return Attempt(model, act, expected=oracle(private.model, x, g, C))

    assert influence(make, adversarial()) is not None


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", MODES)
def test_a_time_major_token_loss_with_sequence_first_inputs_is_clipped_per_sequence(mode, reduction):
    """``batch_first=False``: the model sees [T, B, 4]; the loss is the README's ``criterion(out.view(-1, V),
    target.view(-1, V), shape=(B, T, V))`` over the time-major rows, so the loss vector's entries are not the model's
    sequences: the coefficient must still reach each sequence's rows."""

    def make(b):
        x, g = b
        batch, steps = x.shape[:2]
        model = probe()
        private = make_private(model, mode, clip=C, batch_first=False, reduction=reduction)

        def act():
            out = private.model(x.transpose(0, 1))  # [T, B, 3]
            private.criterion(out.reshape(-1, 3), g.transpose(0, 1).reshape(-1, 3), shape=(batch, steps, 3)).backward()
            private.optimizer.step()

        # mean: each sequence's loss is the mean over its positions, and the optimizer divides by the expected batch
        # size (4)
        per_position = steps if reduction == "mean" else 1
        expected = oracle(private.model, x, g, C, loss=lambda out, t: sample_loss(out, t) / per_position)
        return Attempt(model, act, scale=4.0 if reduction == "mean" else 1.0, expected=expected)

    assert influence(make, adversarial()) is not None


@pytest.mark.parametrize("mode", MODES)
def test_a_model_cast_to_bfloat16_after_make_private_stays_bounded(mode):
    """``model.to(torch.bfloat16)`` after make_private: the coefficient is applied in float32 to the output rows (never
    rounded to the loss's 16 bits first), so a sample's influence stays ≤ C(1 + 10⁻³)."""

    def make(b):
        x, g = b
        model = probe()
        private = make_private(model, mode, clip=C)
        model.to(torch.bfloat16)

        def act():
            private.criterion(private.model(x.to(torch.bfloat16)), g.to(torch.bfloat16)).backward()
            private.optimizer.step()

        return Attempt(model, act)

    assert influence(make, adversarial()) is not None
