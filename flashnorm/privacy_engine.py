"""``FlashNormPrivacyEngine``: Opacus's ``PrivacyEngine`` with FlashNorm's clipping modes.

Accountants, Poisson data loading, module validation and ``make_private_with_epsilon`` are Opacus's. For
``ghost``, ``flash`` and ``flash_fuse`` (alias ``flash_bk``), ``make_private`` returns
``(module, optimizer, criterion, data_loader)``; ``criterion(...).backward()`` runs the clipping workflow
and ``optimizer.step()`` adds noise once. The mode's row (`flashnorm.modes`) and the way the module is
distributed decide the classes (`flashnorm.resolver`).

Distributed: pass a module wrapped with PyTorch's DDP or Opacus's ``DPDDP`` (modes ``ghost``, ``flash``,
``flash_fuse``) or with FSDP2 (modes ``ghost_fsdp``, ``flash_fsdp``, ``flash_fuse_fsdp``; see
`flashnorm.utils.fsdp_utils.FSDP2Wrapper`). A step on W ranks then equals the single-process step on
the union of the local batches, divided by the expected global batch size (``mean``), with the noise added
once across the world.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Union, overload

import torch.distributed as dist
import torch.nn as nn
from opacus import PrivacyEngine as _OpacusPrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .accounting import epsilon, noise_multiplier as _noise_multiplier
from .made_private import MadePrivate, MadePrivateOpacus
from .modes import ClippingModeName, DelegatedModeName, Mode, get_mode
from .utils.poisson import shared_poisson_loader
from .utils.privacy_parameters import PrivacyParameters, check_same_on_every_rank
from .resolver import ModeClasses, resolve


#: The fix named when the ranks' expected batch sizes differ.
_BATCH_HINT = (
    "the step divides by the expected global batch size, so every rank must compute the same one: give every rank "
    "a data loader over the whole dataset with the same batch size (the global batch size; Opacus's distributed "
    "Poisson loader samples each rank's share)"
)


class FlashNormPrivacyEngine(_OpacusPrivacyEngine):
    """Drop-in subclass of `opacus.PrivacyEngine` (same constructor and methods).

    Example:
        >>> engine = FlashNormPrivacyEngine()
        >>> model, optimizer, criterion, loader = engine.make_private(
        ...     module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
        ...     noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="flash_fuse")
        >>> loss = criterion(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    # make_private's result depends on the mode: four values for FlashNorm's clipping modes, three for Opacus's.
    @overload
    def make_private(self, *, module: nn.Module, optimizer: Optimizer, criterion: Optional[nn.Module] = None,
                     data_loader: DataLoader, noise_multiplier: float, max_grad_norm: Union[float, List[float]],
                     grad_sample_mode: ClippingModeName, **kwargs: Any) -> MadePrivate: ...

    @overload
    def make_private(self, *, module: nn.Module, optimizer: Optimizer, criterion: Optional[nn.Module] = None,
                     data_loader: DataLoader, noise_multiplier: float, max_grad_norm: Union[float, List[float]],
                     grad_sample_mode: DelegatedModeName = "hooks", **kwargs: Any) -> MadePrivateOpacus: ...

    @overload
    def make_private(self, *, module: nn.Module, optimizer: Optimizer, criterion: Optional[nn.Module] = None,
                     data_loader: DataLoader, noise_multiplier: float, max_grad_norm: Union[float, List[float]],
                     grad_sample_mode: str, **kwargs: Any) -> Union[MadePrivate, MadePrivateOpacus]: ...

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        criterion: Optional[nn.Module] = None,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: Union[float, List[float]],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        norm_method: Optional[str] = None,
        backend: Optional[str] = None,
        **kwargs: Any,
    ) -> Union[MadePrivate, MadePrivateOpacus]:
        """Opacus's ``make_private``; ``grad_sample_mode`` takes any mode of `flashnorm.modes`.

        ``criterion`` defaults to ``nn.CrossEntropyLoss(reduction=loss_reduction)``. For FlashNorm's modes,
        ``norm_method`` forces a norm method (``"flash"``, ``"gram"``, ``"per_sample"``; default
        ``FLASHNORM_NORM_METHOD``, else planned per layer) and ``backend`` the kernels' backend (``"auto"``,
        ``"triton"``, ``"torch"``; default ``FLASHNORM_BACKEND``, else ``"auto"``).

        Returns:
            `MadePrivate`, ``(module, optimizer, criterion, data_loader)``, for FlashNorm's clipping modes (as
            Opacus's ghost mode returns), `MadePrivateOpacus`, ``(module, optimizer, data_loader)``, for Opacus's
            per-sample-gradient modes. Both are named tuples; unpacked into the other count (``model, optimizer,
            loader = ...`` in a clipping mode), they raise a ``ValueError`` that names their values.

        Raises:
            ValueError: unknown ``grad_sample_mode`` (the message lists the valid ones); a non-finite or
                non-positive ``max_grad_norm``, a negative or non-finite ``noise_multiplier``; a criterion whose
                reduction is not ``loss_reduction``; an ``_fsdp`` mode without an FSDP2 module or the reverse;
                DDP/FSDP ranks that disagree on C, σ, the mode, the loss reduction, the sample rate or the expected
                batch size (one small all-reduce; every rank raises). All before the model is wrapped.
        """
        mode = get_mode(grad_sample_mode)
        if criterion is None:
            criterion = nn.CrossEntropyLoss(reduction=loss_reduction)
        if mode.delegated:
            return MadePrivateOpacus(*super().make_private(
                module=module, optimizer=optimizer, criterion=criterion, data_loader=data_loader,
                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, batch_first=batch_first,
                loss_reduction=loss_reduction, poisson_sampling=poisson_sampling, clipping=clipping,
                noise_generator=noise_generator, grad_sample_mode=mode.name, wrap_model=wrap_model,
                rand_on_empty=rand_on_empty, **kwargs,
            ))
        PrivacyParameters(noise_multiplier, max_grad_norm)  # checked before anything is wrapped
        if getattr(criterion, "reduction", loss_reduction) != loss_reduction:
            raise ValueError(
                f"The criterion has reduction={criterion.reduction!r} but loss_reduction={loss_reduction!r}: pass "
                f"a criterion with reduction={loss_reduction!r} (or omit it for cross-entropy)."
            )
        if clipping != "flat":
            raise ValueError(f"clipping={clipping!r}: grad_sample_mode={mode.name!r} supports flat clipping only.")
        if noise_generator is not None and self.secure_mode:
            raise ValueError("Passing noise_generator is prohibited in secure mode")
        model_parameters = set(module.parameters())
        if any(p not in model_parameters for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("Module parameters are different than optimizer Parameters")
        classes = resolve(mode, module)

        # q = 1 / (the loader's batches per epoch), read before Poisson wrapping: the Poisson loader samples at that q,
        # but its length, int(1 / q), can round one below (1 / (1 / 99) = 98.99…), and 1 / its length would account a
        # rate the sampler never used.
        batches_per_epoch = len(data_loader)
        if classes.distributed and poisson_sampling and not self.secure_mode:
            # Every rank takes every draw (Opacus's distributed sampler skips a rank's empty ones).
            device = next(iter(module.parameters())).device
            data_loader = shared_poisson_loader(data_loader, device=device, batch_first=batch_first,
                                                rand_on_empty=rand_on_empty)
        else:
            data_loader = self._prepare_data_loader(
                data_loader, distributed=classes.distributed, poisson_sampling=poisson_sampling,
                batch_first=batch_first, rand_on_empty=rand_on_empty,
            )
        sample_rate = 1 / (batches_per_epoch if poisson_sampling else len(data_loader))
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)
        if classes.distributed:
            expected_batch_size /= dist.get_world_size()
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        first = next(iter(module.parameters()), None)
        if classes.distributed and first is not None:  # one small all-reduce; every rank raises alike
            check_same_on_every_rank(
                {"max_grad_norm": max_grad_norm, "noise_multiplier": noise_multiplier, "grad_sample_mode": mode.name,
                 "loss_reduction": loss_reduction, "sample_rate": sample_rate,
                 "expected_batch_size": expected_batch_size},
                first.device, hints={"expected_batch_size": _BATCH_HINT},
            )
        module = self._wrap_model(
            module, classes, mode, batch_first=batch_first, loss_reduction=loss_reduction,
            max_grad_norm=max_grad_norm, wrap_model=wrap_model, norm_method=norm_method, backend=backend,
        )
        optimizer = classes.optimizer(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
            generator=self.secure_rng if self.secure_mode else noise_generator, secure_mode=self.secure_mode,
            **kwargs,
        )
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        criterion = classes.criterion(module, optimizer, criterion, loss_reduction)
        return MadePrivate(module, optimizer, criterion, data_loader)

    @overload
    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: Optimizer,
                                  criterion: Optional[nn.Module] = None, data_loader: DataLoader,
                                  target_epsilon: float, target_delta: float, epochs: int,
                                  max_grad_norm: Union[float, List[float]], grad_sample_mode: ClippingModeName,
                                  **kwargs: Any) -> MadePrivate: ...

    @overload
    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: Optimizer,
                                  criterion: Optional[nn.Module] = None, data_loader: DataLoader,
                                  target_epsilon: float, target_delta: float, epochs: int,
                                  max_grad_norm: Union[float, List[float]],
                                  grad_sample_mode: DelegatedModeName = "hooks", **kwargs: Any) -> MadePrivateOpacus: ...

    @overload
    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: Optimizer,
                                  criterion: Optional[nn.Module] = None, data_loader: DataLoader,
                                  target_epsilon: float, target_delta: float, epochs: int,
                                  max_grad_norm: Union[float, List[float]], grad_sample_mode: str,
                                  **kwargs: Any) -> Union[MadePrivate, MadePrivateOpacus]: ...

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        criterion: Optional[nn.Module] = None,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: Union[float, List[float]],
        loss_reduction: str = "mean",
        epsilon_tolerance: float = 0.01,
        **kwargs: Any,
    ) -> Union[MadePrivate, MadePrivateOpacus]:
        """Opacus's ``make_private_with_epsilon``: σ from Opacus's ``get_noise_multiplier`` for ``epochs`` at the
        loader's sample rate (`flashnorm.accounting.noise_multiplier`), then `make_private` (which takes every
        other keyword and returns as it does)."""
        if len(self.accountant) > 0:
            warnings.warn(
                "You're calling make_private_with_epsilon with non-zero privacy budget already spent. Returned "
                "noise_multiplier assumes zero starting point, so your overall privacy budget will be higher."
            )
        noise_multiplier = _noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=1 / len(data_loader), epochs=epochs,
            accountant=self.accountant.mechanism(), epsilon_tolerance=epsilon_tolerance,
        )
        return self.make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=data_loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction, **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``, from the accountant's history, for every accountant: 0 before any step, ``inf``
        once any recorded step had σ = 0 (a step without noise has no finite guarantee), else Opacus's value. (Opacus's
        GDP and PRV accountants raise in the first two cases.) The RDP accountant's orders extend until the optimal
        one is interior, and Opacus's warning about them is not printed (`flashnorm.accounting.epsilon`)."""
        return epsilon(self.accountant, delta)

    def _wrap_model(self, module, classes: ModeClasses, mode: Mode, *, batch_first, loss_reduction, max_grad_norm, wrap_model,
                    norm_method, backend):
        """Validates ``module`` (Opacus's validators) and wraps it with the mode's class and writer (or checks an
        existing wrap)."""
        gsm_class = classes.grad_sample_module
        if not wrap_model:
            raise NotImplementedError(
                f"wrap_model=False is not supported with grad_sample_mode={mode.name!r}; use wrap_model=True "
                "(the returned module is a wrapper whose parameters are your model's own)."
            )
        self.validate(module=module, optimizer=None, data_loader=None)
        if isinstance(module, AbstractGradSampleModule):
            if type(module) is not gsm_class or type(module.config.writer) is not classes.writer or module.batch_first != batch_first or module.loss_reduction != loss_reduction:
                raise ValueError(
                    f"The module is already wrapped ({type(module).__name__}, batch_first={module.batch_first}, "
                    f"loss_reduction={module.loss_reduction!r}), which does not match grad_sample_mode={mode.name!r}, "
                    f"batch_first={batch_first}, loss_reduction={loss_reduction!r}. Pass the plain nn.Module instead."
                )
            return module
        return gsm_class(
            module, batch_first=batch_first, loss_reduction=loss_reduction, max_grad_norm=max_grad_norm,
            norm_algorithm=mode.norm_algorithm, norm_method=norm_method, backend=backend, writer=classes.writer(),
        )


PrivacyEngine = FlashNormPrivacyEngine
"""`FlashNormPrivacyEngine` under Opacus's name, for a one-line import change: `from flashnorm import PrivacyEngine`."""
