"""unwrap_model: the user's module back from make_private's wrappers, with plain state_dict keys."""

import pytest
import torch
import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import PrivacyEngine
from flashnorm.utils.export import unwrap_model


def make_private(module, mode):
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    params = [p for p in module.parameters()]
    out = PrivacyEngine().make_private(
        module=module, optimizer=torch.optim.SGD(params, lr=0.1), criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
    )
    return out[0]


def net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("mode", ["flash_fuse", "ghost", "hooks"])
def test_unwraps_grad_sample_modules(mode):
    model = net()
    wrapped = make_private(model, mode)
    assert any(k.startswith("_module.") for k in wrapped.state_dict())
    assert unwrap_model(wrapped) is model
    assert list(unwrap_model(wrapped).state_dict()) == list(net().state_dict())


def test_unwraps_compile_and_leaves_a_plain_module_alone():
    model = net()
    assert unwrap_model(model) is model
    assert unwrap_model(torch.compile(model)) is model


@pytest.mark.parametrize("ddp", [DDP, DPDDP])
def test_unwraps_distributed_wrappers(one_process_group, ddp):
    model = net()
    wrapped = ddp(model)
    assert unwrap_model(wrapped) is model
    if ddp is DDP:  # FlashNorm's DDP grad-sample module around PyTorch's DDP
        private = make_private(wrapped, "flash_fuse")
        assert next(iter(private.state_dict())).startswith("_module.module.")
        assert unwrap_model(private) is model
