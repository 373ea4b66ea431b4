"""check_privacy_parameters (flashnorm/utils/privacy_parameters.py): σ must be a finite number ≥ 0 and C a finite
number > 0; anything else raises a ValueError naming the parameter and its value."""

import math

import pytest
import torch

from flashnorm.utils.privacy_parameters import check_privacy_parameters


@pytest.mark.parametrize("sigma", [0, 0.0, 1, 0.7, 1e6])
@pytest.mark.parametrize("clip", [1e-12, 1, 0.5, 1e6])
def test_a_finite_sigma_at_least_zero_and_a_finite_clip_above_zero_pass(sigma, clip):
    assert check_privacy_parameters(sigma, clip) is None


@pytest.mark.parametrize("sigma", [-1e-12, -1.0, math.nan, math.inf, -math.inf, True, "1.0", None, torch.tensor(1.0)])
def test_a_noise_multiplier_that_is_not_a_finite_number_at_least_zero_is_refused(sigma):
    with pytest.raises(ValueError, match="noise_multiplier") as err:
        check_privacy_parameters(sigma, 1.0)
    assert repr(sigma) in str(err.value)


@pytest.mark.parametrize("clip", [0, 0.0, -1.0, math.nan, math.inf, False, "1.0", None, [1.0, 2.0]])
def test_a_max_grad_norm_that_is_not_a_finite_number_above_zero_is_refused(clip):
    """Per-layer bounds (a list) included: the message points to Opacus's hooks mode for them."""
    with pytest.raises(ValueError, match=r"max_grad_norm(.|\n)*grad_sample_mode='hooks'") as err:
        check_privacy_parameters(1.0, clip)
    assert repr(clip) in str(err.value)
