"""The user's own module back from what ``make_private`` returned, for export.

``make_private`` wraps the model (a grad-sample module, around DDP when distributed); their
``state_dict`` keys carry the wrappers' prefixes (``_module.``, ``module.``). `unwrap_model`
returns the module the user built, whose parameters are the trained ones (the wrappers never copy
them), so ``unwrap_model(model).save_pretrained(path)`` or ``unwrap_model(model).state_dict()``
gives the plain checkpoint.
"""

from __future__ import annotations

import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch._dynamo.eval_frame import OptimizedModule
from torch.nn.parallel import DataParallel, DistributedDataParallel

#: Wrappers that hold the wrapped module as ``.module``.
_MODULE_WRAPPERS = (DistributedDataParallel, DataParallel, DifferentiallyPrivateDistributedDataParallel)


def _inner(module: nn.Module):
    """The module one wrapper holds, or ``None`` when ``module`` is not a wrapper."""
    if isinstance(module, AbstractGradSampleModule):  # FlashNorm's and Opacus's grad-sample modules
        return module._module
    if isinstance(module, _MODULE_WRAPPERS):
        return module.module
    if isinstance(module, OptimizedModule):  # torch.compile
        return module._orig_mod
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peels every wrapper (grad-sample module, DDP/DPDDP/DataParallel, ``torch.compile``) off ``model``.

    Example:
        >>> dp_model, optimizer, criterion, loader = engine.make_private(module=model, ...)
        >>> unwrap_model(dp_model) is model
        True

    The grad-sample module's hooks stay attached (training can go on); they capture nothing outside
    the wrapper's training forward.
    """
    inner = _inner(model)
    while inner is not None:
        model, inner = inner, _inner(inner)
    return model
