"""How a module is distributed, detected in one place: one process, DDP, Opacus's ``DPDDP`` or FSDP2."""

from __future__ import annotations

import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

PARALLELISMS = ("single", "dpddp", "ddp", "fsdp")


def parallelism_of(module: nn.Module) -> str:
    """``"fsdp"`` (FSDP2 anywhere in the module), ``"ddp"`` (PyTorch's DDP), ``"dpddp"`` (Opacus's) or ``"single"``."""
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return "fsdp"
    if isinstance(module, DPDDP):
        return "dpddp"
    if isinstance(module, DistributedDataParallel):
        return "ddp"
    return "single"


def reduces_in_backward(parallelism: str) -> bool:
    """Whether that parallelism's hooks reduce gradients across ranks during a backward pass (DDP, FSDP2; Opacus's
    ``DPDDP`` leaves the reduction to the DP optimizer)."""
    return parallelism in ("ddp", "fsdp")
