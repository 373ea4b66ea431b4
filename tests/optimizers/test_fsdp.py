"""The FSDP2 optimizer (flashnorm/optimizers/fsdp.py) on a process group of one rank: make_private gives it to a
module sharded by FSDP2Wrapper in an ``_fsdp`` mode, and its step is the single-process step of the same mode
without FSDP, noise included (the owner of each element adds the single-device draw of the same seed).
Two ranks, shards owned across the world: tests/distributed/."""

import pytest
from torch.distributed.device_mesh import init_device_mesh

from flashnorm import get_mode, valid_mode_names
from flashnorm.optimizers import FSDPOptimizerFastGradientClipping
from flashnorm.utils.fsdp_utils import FSDP2Wrapper
from tests.optimizers.one_rank import assert_same_step, noisy_step

FSDP_MODES = tuple(name for name in valid_mode_names() if get_mode(name).fsdp)


def _fsdp(model):
    return FSDP2Wrapper(model, mesh=init_device_mesh("cpu", (1,)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", FSDP_MODES)
def test_one_rank_step_is_the_single_process_step(one_process_group, mode, reduction):
    single_mode = mode.removesuffix("_fsdp")
    assert not get_mode(single_mode).fsdp and get_mode(single_mode).passes == get_mode(mode).passes
    single_optimizer, single = noisy_step(single_mode, reduction)
    optimizer, params = noisy_step(mode, reduction, _fsdp)
    assert isinstance(optimizer, FSDPOptimizerFastGradientClipping)
    assert not isinstance(single_optimizer, FSDPOptimizerFastGradientClipping)
    assert optimizer.world_size == 1
    assert_same_step(params, single)
