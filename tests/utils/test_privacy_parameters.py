"""PrivacyParameters (flashnorm/utils/privacy_parameters.py): σ must be a finite number ≥ 0 and C a finite number > 0;
anything else raises a ValueError naming the parameter and its value. The DP optimizer owns them and the grad-sample
module clips with the same object."""

import math

import pytest
import torch

from flashnorm.utils.privacy_parameters import PrivacyParameters


@pytest.mark.parametrize("sigma", [0, 0.0, 1, 0.7, 1e6])
@pytest.mark.parametrize("clip", [1e-12, 1, 0.5, 1e6])
def test_a_finite_sigma_at_least_zero_and_a_finite_clip_above_zero_pass(sigma, clip):
    assert PrivacyParameters(sigma, clip).clip_bound() == clip


@pytest.mark.parametrize("sigma", [-1e-12, -1.0, math.nan, math.inf, -math.inf, True, "1.0", None, torch.tensor(1.0)])
def test_a_noise_multiplier_that_is_not_a_finite_number_at_least_zero_is_refused(sigma):
    with pytest.raises(ValueError, match="noise_multiplier") as err:
        PrivacyParameters(sigma, 1.0)
    assert repr(sigma) in str(err.value)


@pytest.mark.parametrize("clip", [0, 0.0, -1.0, math.nan, math.inf, False, "1.0", None, [1.0, 2.0]])
def test_a_max_grad_norm_that_is_not_a_finite_number_above_zero_is_refused(clip):
    """Per-layer bounds (a list) included: the message points to Opacus's hooks mode for them."""
    with pytest.raises(ValueError, match=r"max_grad_norm(.|\n)*grad_sample_mode='hooks'") as err:
        PrivacyParameters(1.0, clip)
    assert repr(clip) in str(err.value)


def test_a_value_set_after_construction_is_refused_where_it_is_used():
    """Opacus's schedulers assign σ and C between steps: the next use checks them."""
    privacy = PrivacyParameters(1.0, 1.0)
    privacy.max_grad_norm = math.inf
    with pytest.raises(ValueError, match="max_grad_norm"):
        privacy.clip_bound()


def test_the_module_clips_with_the_optimizers_parameters():
    """One owner: the criterion hands the optimizer's PrivacyParameters to the module, so a C changed on the
    optimizer (a clipping scheduler) is the C the module clips to, and σ·C the noise is sized for."""
    from torch.utils.data import DataLoader, TensorDataset

    from flashnorm import PrivacyEngine

    model = torch.nn.Linear(3, 2)
    data = DataLoader(TensorDataset(torch.randn(4, 3), torch.randint(0, 2, (4,))), batch_size=4)
    dp_model, optimizer, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
        noise_multiplier=0.5, max_grad_norm=2.0, grad_sample_mode="flash_fuse",
    )
    assert dp_model.privacy is optimizer.privacy
    optimizer.max_grad_norm = 0.25
    assert dp_model.max_grad_norm == 0.25 and optimizer.privacy.max_grad_norm == 0.25
