"""How a module is distributed (flashnorm/parallelism.py): a plain module is "single"; PyTorch's DDP "ddp", Opacus's
DPDDP "dpddp" and FSDP2 anywhere in the module "fsdp" (on a gloo process group of one rank); which of them reduce
gradients during a backward pass."""

import pytest
import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from flashnorm.parallelism import PARALLELISMS, parallelism_of, reduces_in_backward
from flashnorm.utils.fsdp_utils import FSDP2Wrapper
from tests.optimizers.one_rank import Blocks


@pytest.mark.parametrize("module", [nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2), nn.Tanh()), nn.Tanh(), Blocks()],
                         ids=["layer", "sequential", "no-parameters", "blocks"])
def test_a_plain_module_is_single(module):
    assert parallelism_of(module) == "single"


def test_pytorchs_ddp_is_ddp(one_process_group):
    assert parallelism_of(DDP(nn.Linear(3, 2))) == "ddp"


def test_opacus_dpddp_is_dpddp(one_process_group):
    wrapped = DPDDP(nn.Linear(3, 2))
    assert not isinstance(wrapped, DDP), "DPDDP is not PyTorch's DDP"
    assert parallelism_of(wrapped) == "dpddp"


def test_fsdp2_anywhere_is_fsdp(one_process_group):
    mesh = init_device_mesh("cpu", (1,))
    assert parallelism_of(FSDP2Wrapper(Blocks(), mesh=mesh)) == "fsdp"
    model = Blocks()
    fully_shard(model.blocks[1], mesh=mesh)  # one unit deep inside a plain module
    assert parallelism_of(model) == "fsdp"


def test_ddp_and_fsdp_reduce_in_the_backward_pass():
    assert PARALLELISMS == ("single", "dpddp", "ddp", "fsdp")
    assert [reduces_in_backward(p) for p in PARALLELISMS] == [False, False, True, True]
