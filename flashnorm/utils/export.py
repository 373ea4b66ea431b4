"""The user's own module back from what ``make_private`` returned, for export.

``make_private`` wraps the model (a grad-sample module, around DDP when distributed); their
``state_dict`` keys carry the wrappers' prefixes (``_module.``, ``module.``). `unwrap_model`
returns the module the user built, whose parameters are the trained ones (the wrappers never copy
them), so ``unwrap_model(model).save_pretrained(path)`` or ``unwrap_model(model).state_dict()``
gives the plain checkpoint.

A PEFT model (``peft.PeftModel``, e.g. LoRA from ``get_peft_model``) is the module the user built: `unwrap_model`
returns it, so its ``save_pretrained`` writes the adapter the PEFT way (``adapter_config.json``,
``adapter_model.safetensors``). ``unwrap_model(model, peft=True)`` goes on through PEFT's own wrappers to the
``transformers`` model under the adapters (``PeftModel.get_base_model()``: its ``config``, its class).
"""

from __future__ import annotations

import sys

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


def peft_model_of(model: nn.Module):
    """The ``peft.PeftModel`` that ``model`` is or wraps (grad-sample module, DDP, ``torch.compile``), else ``None``.

    Does not import ``peft``: a model can be a PEFT model only once ``peft`` has been imported."""
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel

    model = unwrap_model(model)
    return model if isinstance(model, PeftModel) else None


def _inner_peft(module: nn.Module):
    """The module one of PEFT's wrappers holds (``PeftModel`` → the ``transformers`` model, a tuner such as
    ``LoraModel`` → its ``model``), or ``None``."""
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(module, PeftModel):
        return module.get_base_model()
    if isinstance(module, BaseTuner):
        return module.model
    return None


def unwrap_model(model: nn.Module, *, peft: bool = False) -> nn.Module:
    """Peels every wrapper (grad-sample module, DDP/DPDDP/DataParallel, ``torch.compile``) off ``model``.

    Args:
        model: what ``make_private`` returned, or any of the wrappers above around the user's module.
        peft: also peel PEFT's wrappers (``PeftModel``, its tuner such as ``LoraModel``), down to the
            ``transformers`` model whose layers hold the adapters. Default ``False``: a PEFT model is returned as
            it is, being the user's module (its ``save_pretrained`` writes the adapter).

    Example:
        >>> dp_model, optimizer, criterion, loader = engine.make_private(module=model, ...)
        >>> unwrap_model(dp_model) is model
        True
        >>> unwrap_model(dp_lora_model, peft=True)   # the GPT2LMHeadModel under get_peft_model(...)

    The grad-sample module's hooks stay attached (training can go on); they capture nothing outside
    the wrapper's training forward.
    """
    while True:
        inner = _inner(model)
        if inner is None and peft:
            inner = _inner_peft(model)
        if inner is None:
            return model
        model = inner
