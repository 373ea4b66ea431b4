"""The public API as a type checker sees it: ``mypy`` checks this file in CI (``.ci/run``), and
tests/test_packaging.py both runs it and runs mypy on it.

``assert_type`` fails the check when an expression's type differs, ``Any`` included, so each line below says that
``make_private``'s results and the DP loss are typed.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import assert_type

import flashnorm
from flashnorm import PrivacyEngine
from flashnorm.criterion import DPLossFastGradientClipping, DPTensorFastGradientClipping
from flashnorm.grad_sample import FlashNormGradSampleModule
from flashnorm.made_private import MadePrivate, MadePrivateOpacus
from flashnorm.optimizers import DPOptimizerFastGradientClipping


def run() -> None:
    """A clipping mode (four values) and an Opacus mode (three), one step each."""
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,)))
    net = nn.Linear(8, 2)
    engine = PrivacyEngine()
    result = engine.make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
        grad_sample_mode="flash_fuse",
    )
    assert_type(result, MadePrivate)
    model, optimizer, criterion, loader = result
    assert_type(model, FlashNormGradSampleModule)
    assert_type(optimizer, DPOptimizerFastGradientClipping)
    assert_type(criterion, DPLossFastGradientClipping)
    assert_type(loader, DataLoader)
    x, y = data[:8]
    loss = criterion(model(x), y)
    assert_type(loss, DPTensorFastGradientClipping)
    assert_type(loss.item(), float)
    assert_type(loss.mean(), DPTensorFastGradientClipping)
    assert_type(loss.detach(), torch.Tensor)
    loss.backward()
    optimizer.step()
    assert_type(engine.get_epsilon(1e-5), float)
    assert_type(flashnorm.__version__, str)

    other = nn.Linear(8, 2)
    opacus_result = PrivacyEngine().make_private(
        module=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
    )  # Opacus's default mode, hooks
    assert_type(opacus_result, MadePrivateOpacus)
    _, _, opacus_loader = opacus_result
    assert_type(opacus_loader, DataLoader)

    mode: str = "flash"  # a mode known only at run time: either result
    third = nn.Linear(8, 2)
    either = PrivacyEngine().make_private_with_epsilon(
        module=third, optimizer=torch.optim.SGD(third.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8), target_epsilon=8.0, target_delta=1e-5, epochs=1,
        max_grad_norm=1.0, grad_sample_mode=mode,
    )
    assert_type(either, Union[MadePrivate, MadePrivateOpacus])


if __name__ == "__main__":
    run()
