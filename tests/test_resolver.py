"""What a mode row builds (flashnorm/resolver.py): every FlashNorm mode on a plain module resolves to the class and
writer its row names; under DDP, Opacus's DPDDP and FSDP2 (one gloo rank) to their classes; delegated modes and a
mode that does not match the module's FSDP2 wrapping raise, naming the fix."""

import pytest
import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from flashnorm import get_mode, valid_mode_names
from flashnorm.criterion import DPLossFastGradientClipping
from flashnorm.grad_sample import (
    AssembleFromKept,
    DDPGradSampleModule,
    FlashNormGradSampleModule,
    FSDPGradSampleModule,
    ReduceScatterAssembly,
    SecondBackward,
)
from flashnorm.optimizers import (
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)
from flashnorm.resolver import module_class, resolve
from flashnorm.utils.fsdp_utils import FSDP2Wrapper
from tests.optimizers.one_rank import Blocks

#: mode → (grad-sample module class name on one device, writer), as the modes table's rows give them.
SINGLE = {
    "ghost": ("GradSampleModuleFastGradientClipping", SecondBackward),
    "flash": ("GradSampleModuleFastGradientClipping", SecondBackward),
    "flash_fuse": ("GradSampleModuleFastGradientClippingFuse", AssembleFromKept),
    "flash_bk": ("GradSampleModuleFastGradientClippingFuse", AssembleFromKept),
}
FSDP = {
    "ghost_fsdp": ("FSDPGradSampleModuleFastGradientClipping", SecondBackward),
    "flash_fsdp": ("FSDPGradSampleModuleFastGradientClipping", SecondBackward),
    "flash_fuse_fsdp": ("FSDPGradSampleModuleFastGradientClippingFuse", ReduceScatterAssembly),
}
DELEGATED = [name for name in valid_mode_names() if get_mode(name).delegated]


def test_every_mode_is_delegated_single_or_fsdp():
    assert sorted(valid_mode_names()) == sorted([*DELEGATED, *SINGLE, *FSDP])
    assert sorted(DELEGATED) == ["ew", "functorch", "hooks", "no_op"]


@pytest.mark.parametrize("name", SINGLE)
def test_a_mode_on_a_plain_module_builds_its_rows_class_and_writer(name):
    classes = resolve(get_mode(name), nn.Linear(3, 2))
    class_name, writer = SINGLE[name]
    assert classes.grad_sample_module.__name__ == class_name and classes.writer is writer
    assert classes.grad_sample_module.writer_class is writer
    assert classes.optimizer is DPOptimizerFastGradientClipping and classes.criterion is DPLossFastGradientClipping
    assert classes.distributed is False
    assert type(classes.grad_sample_module(nn.Linear(3, 2)).config.writer) is writer


@pytest.mark.parametrize("name", DELEGATED)
def test_a_delegated_mode_builds_nothing(name):
    with pytest.raises(ValueError, match=f"grad_sample_mode='{name}' is Opacus's own"):
        resolve(get_mode(name), nn.Linear(3, 2))


@pytest.mark.parametrize("name", FSDP)
def test_an_fsdp_mode_without_fsdp2_names_the_fix(name):
    with pytest.raises(ValueError, match=r"need a module wrapped with FSDP2.*Fix: .*FSDP2Wrapper\(model\)"):
        resolve(get_mode(name), nn.Linear(3, 2))


@pytest.mark.parametrize("wrapper", [DDP, DPDDP], ids=["ddp", "dpddp"])
@pytest.mark.parametrize("name", SINGLE)
def test_data_parallel_modules_build_the_distributed_optimizer(one_process_group, name, wrapper):
    """DDP gets its own grad-sample classes (its forward under no_sync); DPDDP reduces nothing in the backward pass
    and keeps the single-device ones."""
    classes = resolve(get_mode(name), wrapper(nn.Linear(3, 2)))
    class_name, writer = SINGLE[name]
    assert classes.grad_sample_module.__name__ == ("DDP" if wrapper is DDP else "") + class_name
    assert issubclass(classes.grad_sample_module, DDPGradSampleModule) == (wrapper is DDP)
    assert classes.writer is writer and classes.grad_sample_module.writer_class is writer
    assert classes.optimizer is DistributedDPOptimizerFastGradientClipping and classes.distributed is True


def _fsdp2(one_unit_per_layer=False):
    model = Blocks()
    mesh = init_device_mesh("cpu", (1,))
    if one_unit_per_layer:  # a layer holding parameters is a unit itself
        fully_shard(model.head, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return FSDP2Wrapper(model, mesh=mesh)


@pytest.mark.parametrize("name", FSDP)
def test_fsdp2_modes_on_fsdp2(one_process_group, name):
    classes = resolve(get_mode(name), _fsdp2())
    class_name, writer = FSDP[name]
    assert classes.grad_sample_module.__name__ == class_name and classes.writer is writer
    assert issubclass(classes.grad_sample_module, FSDPGradSampleModule)
    assert classes.optimizer is FSDPOptimizerFastGradientClipping and classes.distributed is True


def test_fsdp2_refuses_a_mode_without_fsdp_and_a_layer_as_a_unit(one_process_group):
    with pytest.raises(ValueError, match="use grad_sample_mode='flash_fuse_fsdp' instead of 'flash_fuse'"):
        resolve(get_mode("flash_fuse"), _fsdp2())
    with pytest.raises(NotImplementedError, match=r"'head' \(Linear\) holds parameters and is an FSDP2 unit"):
        resolve(get_mode("flash_fsdp"), _fsdp2(one_unit_per_layer=True))


@pytest.mark.parametrize("parallelism,base", [
    ("single", FlashNormGradSampleModule), ("dpddp", FlashNormGradSampleModule), ("ddp", DDPGradSampleModule),
    ("fsdp", FSDPGradSampleModule),
])
def test_a_writer_without_a_named_class_gets_the_base_class(parallelism, base):
    class Custom(AssembleFromKept):
        pass

    assert module_class(parallelism, Custom) is base
    assert module_class(parallelism, SecondBackward).writer_class is SecondBackward
    assert module_class(parallelism, SecondBackward).__mro__[1] is base
