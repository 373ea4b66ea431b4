"""The DDP optimizer (flashnorm/optimizers/distributed.py) on a process group of one rank: make_private gives it to
a DDP or DPDDP module, and its step is the single-process step, noise included (rank 0 draws what the
single-device optimizer draws with the same seed; B is W × the per-worker expected batch size). Two ranks, the
all-reduce and the noise added once across the world: tests/distributed/."""

import pytest
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.nn.parallel import DistributedDataParallel as DDP

from flashnorm.optimizers import DistributedDPOptimizerFastGradientClipping
from tests.conftest import CLIPPING_MODES
from tests.optimizers.one_rank import assert_same_step, noisy_step


@pytest.mark.parametrize("wrapper", [DDP, DPDDP], ids=["ddp", "dpddp"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_one_rank_step_is_the_single_process_step(one_process_group, mode, reduction, wrapper):
    single_optimizer, single = noisy_step(mode, reduction)
    optimizer, params = noisy_step(mode, reduction, wrapper)
    assert isinstance(optimizer, DistributedDPOptimizerFastGradientClipping)
    assert not isinstance(single_optimizer, DistributedDPOptimizerFastGradientClipping)
    assert optimizer.world_size == 1 and optimizer.rank == 0
    assert_same_step(params, single)
