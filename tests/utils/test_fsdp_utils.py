"""FSDP2Wrapper and the shard geometry (flashnorm/utils/fsdp_utils.py): which modules become FSDP2 units, which
rows of a full tensor a rank owns, and the part of a full tensor a rank's shard holds (on a process group of one
rank; two ranks: tests/distributed/)."""

import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from flashnorm.utils.fsdp_utils import FSDP2Wrapper, RowShard, owned_part, row_shard, transformer_block_types
from tests.optimizers.one_rank import Blocks


class _Block(nn.Module):
    """Holds no parameter directly: its layers do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.linears = nn.ModuleList([nn.Linear(4, 4)])  # layers holding parameters: never units
        self.head = nn.Linear(4, 2)


def test_block_types_are_the_parameterless_modules_of_module_lists():
    assert transformer_block_types(_Nested()) == (_Block,)
    assert transformer_block_types(Blocks()) == (nn.Sequential,)
    assert transformer_block_types(nn.Sequential(nn.Linear(4, 4), nn.Tanh())) == ()


def test_a_block_type_holding_parameters_is_refused_before_sharding():
    model = _Nested()
    with pytest.raises(ValueError, match="Linear holds parameters directly"):
        FSDP2Wrapper(model, block_types=(nn.Linear,))
    assert not any(isinstance(m, FSDPModule) for m in model.modules())
    assert not any(isinstance(p, DTensor) for p in model.parameters())


@pytest.mark.parametrize("n0,world,owned", [(7, 2, [4, 3]), (8, 2, [4, 4]), (1, 2, [1, 0]), (5, 4, [2, 2, 1, 0]),
                                            (3, 1, [3])])
def test_rank_r_owns_rows_r_times_ceil_n0_over_w_onward(n0, world, owned):
    """torch.chunk's layout: ⌈n₀/W⌉ rows per rank, the last ranks holding fewer (or none)."""
    rows = -(-n0 // world)
    assert [RowShard(rank, world, rows).local_rows(n0) for rank in range(world)] == owned
    assert sum(owned) == n0


def test_a_plain_tensor_has_no_row_shard():
    assert row_shard(torch.zeros(3, 4)) is None


def test_the_wrapper_shards_the_blocks_and_the_root(one_process_group):
    model = Blocks()
    full = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert FSDP2Wrapper(model, mesh=init_device_mesh("cpu", (1,))) is model
    assert isinstance(model, FSDPModule) and all(isinstance(block, FSDPModule) for block in model.blocks)
    assert not isinstance(model.head, FSDPModule) and not isinstance(model.blocks[0][0], FSDPModule)
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
        assert row_shard(p) == RowShard(0, 1, p.shape[0])
        assert torch.equal(owned_part(full[name], p), full[name])  # one rank owns everything
        assert torch.equal(p.full_tensor(), full[name])


def test_another_layout_has_no_row_shard_and_its_owned_part_is_its_local_shard(one_process_group):
    model = Blocks()
    full = {name: p.detach().clone() for name, p in model.named_parameters()}
    FSDP2Wrapper(model, mesh=init_device_mesh("cpu", (1,)),
                 shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    weight = model.head.weight
    assert weight.placements == (Shard(1),) and row_shard(weight) is None
    assert torch.equal(owned_part(full["head.weight"], weight), weight.to_local())
