"""``FlashNormPrivacyEngine``: Opacus's ``PrivacyEngine`` with FlashNorm's clipping modes.

Accountants, Poisson data loading, module validation, noise, checkpoints and
``make_private_with_epsilon`` are Opacus's. For ``ghost``, ``flash`` and ``flash_fuse``
(alias ``flash_bk``), ``make_private`` returns ``(module, optimizer, criterion, data_loader)``;
``criterion(...).backward()`` runs the clipping workflow and ``optimizer.step()`` adds noise once.

Distributed: pass a module wrapped with PyTorch's DDP or Opacus's ``DPDDP`` (modes ``ghost``,
``flash``, ``flash_fuse``) or with FSDP2 (modes ``ghost_fsdp``, ``flash_fsdp``, ``flash_fuse_fsdp``; see
:func:`flashnorm.utils.fsdp_utils.FSDP2Wrapper`). A step on W ranks then equals the single-process step
on the union of the local batches, divided by the expected global batch size (``mean``), with the noise
added once across the world; see :mod:`flashnorm.grad_sample.ddp`, :mod:`flashnorm.grad_sample.fsdp` and
:mod:`flashnorm.optimizers`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from opacus import PrivacyEngine as _OpacusPrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from .grad_sample import gsm_class
from .grad_sample.ddp import DDPGradSampleModuleFastGradientClipping, DDPGradSampleModuleFastGradientClippingFuse
from .grad_sample.fsdp import (
    FSDPGradSampleModuleFastGradientClipping,
    FSDPGradSampleModuleFastGradientClippingFuse,
    check_fsdp_layout,
)
from .modes import Mode, get_mode
from .optimizers import (
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)
from .utils.fast_gradient_clipping_utils import DPLossFastGradientClipping


def _gsm_class_for(mode: Mode, module: nn.Module) -> type:
    """The grad-sample module class for ``mode`` and the way ``module`` is distributed.

    Raises:
        ValueError: an ``_fsdp`` mode without FSDP2, or FSDP2 without an ``_fsdp`` mode.
        NotImplementedError: an FSDP2 layout FlashNorm's hooks cannot serve.
    """
    if mode.fsdp:
        check_fsdp_layout(module)
        return FSDPGradSampleModuleFastGradientClippingFuse if mode.fused else FSDPGradSampleModuleFastGradientClipping
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        raise ValueError(
            f"The module is wrapped with FSDP2; use grad_sample_mode={mode.name + '_fsdp'!r} instead of {mode.name!r}."
        )
    if isinstance(module, DistributedDataParallel):
        return DDPGradSampleModuleFastGradientClippingFuse if mode.fused else DDPGradSampleModuleFastGradientClipping
    return gsm_class(mode)


def _check_same_on_every_rank(name: str, value: float, device: torch.device) -> None:
    """Raises unless every rank passes the same ``value`` (two small all-reduces)."""
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    low, high = -float(t[1]), float(t[0])
    if low != high:
        raise ValueError(
            f"{name} differs across ranks (from {low} to {high}). The step divides by the expected global batch "
            "size, so every rank must compute the same one: give every rank a data loader over the whole dataset "
            "with the same batch size (the global batch size; Opacus's distributed Poisson loader samples each "
            "rank's share)."
        )


class FlashNormPrivacyEngine(_OpacusPrivacyEngine):
    """Drop-in subclass of :class:`opacus.PrivacyEngine` (same constructor and methods).

    Example:
        >>> engine = FlashNormPrivacyEngine()
        >>> model, optimizer, criterion, loader = engine.make_private(
        ...     module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
        ...     noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="flash_fuse")
        >>> loss = criterion(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer,
        criterion=nn.CrossEntropyLoss(),  # noqa: B008 - Opacus's default
        data_loader,
        noise_multiplier: float,
        max_grad_norm,
        loss_reduction: str = "mean",
        grad_sample_mode: str = "hooks",
        **kwargs,
    ):
        """Opacus's ``make_private``; ``grad_sample_mode`` takes any mode of :mod:`flashnorm.modes`.

        Raises:
            ValueError: unknown ``grad_sample_mode`` (the message lists the valid ones); an ``_fsdp`` mode
                without an FSDP2 module or the reverse; ranks that disagree on the expected batch size.
        """
        mode = get_mode(grad_sample_mode)
        result = super().make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            loss_reduction=loss_reduction,
            grad_sample_mode=mode.name,
            **kwargs,
        )
        if mode.delegated or len(result) == 4:
            return result
        module, optimizer, data_loader = result
        criterion = self._prepare_criterion(
            module=module, optimizer=optimizer, criterion=criterion, loss_reduction=loss_reduction
        )
        return module, optimizer, criterion, data_loader

    def _prepare_model(
        self,
        module: nn.Module,
        *,
        batch_first: bool = True,
        max_grad_norm=1.0,
        loss_reduction: str = "mean",
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
    ):
        mode = get_mode(grad_sample_mode)
        if mode.delegated:
            return super()._prepare_model(
                module,
                batch_first=batch_first,
                max_grad_norm=max_grad_norm,
                loss_reduction=loss_reduction,
                grad_sample_mode=mode.name,
                wrap_model=wrap_model,
            )
        if not wrap_model:
            raise NotImplementedError(
                f"wrap_model=False is not supported with grad_sample_mode={mode.name!r}; use wrap_model=True "
                "(the returned module is a wrapper whose parameters are your model's own)."
            )
        self.validate(module=module, optimizer=None, data_loader=None)
        if isinstance(module, AbstractGradSampleModule):
            cls = _gsm_class_for(mode, module._module)
            if type(module) is not cls or module.batch_first != batch_first or module.loss_reduction != loss_reduction:
                raise ValueError(
                    f"The module is already wrapped ({type(module).__name__}, batch_first={module.batch_first}, "
                    f"loss_reduction={module.loss_reduction!r}), which does not match grad_sample_mode={mode.name!r}, "
                    f"batch_first={batch_first}, loss_reduction={loss_reduction!r}. Pass the plain nn.Module instead."
                )
            return module
        return _gsm_class_for(mode, module)(
            module,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            max_grad_norm=max_grad_norm,
            use_flash_clipping=mode.norm_method == "flash",
            use_ghost_clipping=True,
        )

    def _prepare_optimizer(
        self,
        *,
        optimizer,
        noise_multiplier: float,
        max_grad_norm,
        expected_batch_size: int,
        loss_reduction: str = "mean",
        distributed: bool = False,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        **kwargs,
    ):
        mode = get_mode(grad_sample_mode)
        if mode.delegated:
            return super()._prepare_optimizer(
                optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, distributed=distributed,
                clipping=clipping, noise_generator=noise_generator, grad_sample_mode=mode.name, **kwargs,
            )
        if clipping != "flat":
            raise ValueError(f"clipping={clipping!r}: grad_sample_mode={mode.name!r} supports flat clipping only.")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        optim_class = DPOptimizerFastGradientClipping
        if distributed:
            optim_class = FSDPOptimizerFastGradientClipping if mode.fsdp else DistributedDPOptimizerFastGradientClipping
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if params:
                _check_same_on_every_rank("expected_batch_size", expected_batch_size, params[0].device)
        return optim_class(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=self.secure_rng if self.secure_mode else noise_generator,
            secure_mode=self.secure_mode,
            **kwargs,
        )

    def _prepare_criterion(self, *, module, optimizer, criterion, loss_reduction: str = "mean", **kwargs):
        return DPLossFastGradientClipping(module, optimizer, criterion, loss_reduction)


#: Opacus's name, for a one-line import change.
PrivacyEngine = FlashNormPrivacyEngine
