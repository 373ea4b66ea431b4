"""Lightning's `Trainer` with FlashNorm's DP criterion: `DPStrategy` (one device) and `DPDDPStrategy` (DDP).

FlashNorm's criterion returns a DP loss (per-sample losses ℓ: [B] whose `backward()` runs the clipping
workflow), not a `Tensor`, so Lightning's automatic loop refuses it ("training_step must return a Tensor").
Both strategies let `training_step` return that DP loss (alone or under `"loss"` in a dict) — Lightning gets its
value, mean_b ℓ_b, for logging — and run the DP loss's own backward for that step (Σ_b c_b ∇ℓ_b into `p.grad`).
The optimizer step (noise, division by the expected batch size, accountant step) is the DP optimizer's own,
called by Lightning.

The LightningModule does what an Opacus user does with Lightning: `configure_optimizers` calls `make_private`
on its network, optimizer and training loader, keeps the wrapped network and the DP criterion, returns the DP
optimizer, and `train_dataloader` returns the Poisson loader (Lightning asks for the loaders after the
optimizers). The network goes through `self.trainer.strategy.distribute(...)`: the network itself under
`DPStrategy`, the network in PyTorch's `DistributedDataParallel` under `DPDDPStrategy`, so one module trains
on one device or several:

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.engine = make_net(), PrivacyEngine()  # the engine an attribute: checkpoints carry it

        def configure_optimizers(self):
            self.dp_net, optimizer, self.criterion, self.loader = self.engine.make_private(
                module=self.trainer.strategy.distribute(self.net),
                optimizer=torch.optim.SGD(self.net.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
                data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="flash_fuse")
            return optimizer

        def train_dataloader(self):
            return self.loader

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.criterion(self.dp_net(x), y)

    L.Trainer(strategy=DPStrategy(), max_epochs=1).fit(model)                       # the Trainer's device
    L.Trainer(strategy=DPDDPStrategy(), devices=2, max_epochs=1).fit(model)         # 2 processes

Devices: `DPStrategy()` trains on the device the Trainer picks (`accelerator`, `devices`; the GPU when there is
one) and `DPDDPStrategy()` on one device per process, as Lightning's own strategies do.

Checkpoints (`ModelCheckpoint`, `trainer.save_checkpoint`) carry the state of every `PrivacyEngine` attribute of
the LightningModule (its accountant's history) and the random state the DP steps draw from (the CPU's and the
device's generators, and the DP optimizers' and Poisson loaders' own generators; none under `secure_mode`).
`fit(ckpt_path=...)` restores the weights once `configure_optimizers` has made the DP modules, the optimizer
and the accountant, so ε goes on from the checkpoint's, and the random streams go on too: a resumed run neither
repeats the noise or the batches of the steps before the checkpoint (even where the script seeds again) and, with
the same seed, takes the steps the uninterrupted run takes. The weights are saved once, under the network's own
names (not again under the DP wrapper's), so `Model.load_from_checkpoint` loads them into a fresh module.

Manual optimisation needs no more: `self.manual_backward(loss)` runs the DP loss's backward (and training_step
may return the DP loss for logging).

`accumulate_grad_batches=k` sums the clipped sums of k batches into one step, divided by k × the expected batch
size and accounted at k × the sample rate, as Opacus's hooks mode does. Refused: `gradient_clip_val` (the
per-sample bound is `max_grad_norm`) and fp16 (its loss scaler is not applied to the DP loss). Needs the
`[lightning]` extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from opacus import PrivacyEngine as _OpacusPrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..criterion import DPTensorFastGradientClipping
from ..optimizers import DistributedDPOptimizerFastGradientClipping
from ..utils.poisson import RankShareSampler

#: The key of FlashNorm's state in a Lightning checkpoint.
CHECKPOINT_KEY = "flashnorm"

#: Modules whose parameters are another module's, under another name: the DP wrappers.
_WRAPPERS = (AbstractGradSampleModule, DistributedDataParallel)

_POISSON_SAMPLERS = (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)


class _DPTraining:
    """What both strategies add to Lightning's: the DP loss's backward, the checks, the DP state in checkpoints."""

    _dp_loss: Optional[DPTensorFastGradientClipping] = None
    _pending_loader_rng: Optional[List[List[torch.Tensor]]] = None

    # -- set-up ---------------------------------------------------------------------------------------------

    def setup(self, trainer) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(
                f"gradient_clip_val={trainer.gradient_clip_val}: DP clips each sample's gradient to the max_grad_norm "
                "given to make_private; clipping the noisy batch gradient again is not part of DP-SGD."
            )
        if str(trainer.precision).startswith("16-mixed"):
            raise ValueError(
                "precision='16-mixed' needs a loss scaler, which the DP loss does not use: use 'bf16-mixed'."
            )
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers()

    def _dp_optimizers(self) -> List[DPOptimizer]:
        return [opt for opt in self.optimizers if isinstance(opt, DPOptimizer)]

    def _check_optimizers(self) -> None:
        """The DP optimizers' accountants must be where checkpoints find them."""
        if self._dp_optimizers() and not _engines(self.lightning_module):
            raise ValueError(
                f"{type(self).__name__} keeps the privacy accountant in Lightning checkpoints and finds it as a "
                f"PrivacyEngine attribute of the LightningModule, but {type(self.lightning_module).__name__} has none: "
                "keep the engine that made the optimizer private as an attribute (self.engine = PrivacyEngine(...))."
            )

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """`fit(ckpt_path=...)` loads the weights after `configure_optimizers`, once the DP modules exist."""
        return True

    def distribute(self, module: nn.Module) -> nn.Module:
        """The network to pass to `make_private` (`module=self.trainer.strategy.distribute(self.net)`): here the
        network itself."""
        return module

    # -- the step -------------------------------------------------------------------------------------------

    def training_step(self, *args: Any, **kwargs: Any):
        """The module's `training_step`; a DP loss in its output is replaced by its value (a detached scalar,
        `mean_b ℓ_b` for `loss_reduction="mean"`) and, under automatic optimisation, kept for the backward."""
        output = super().training_step(*args, **kwargs)
        automatic = self.lightning_module.automatic_optimization
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if loss is None:  # Lightning skips the step
            return output
        if not isinstance(loss, DPTensorFastGradientClipping):
            if not automatic:
                return output
            raise TypeError(
                f"training_step returned a {type(loss).__name__} loss; {type(self).__name__} trains on the loss of "
                "FlashNorm's DP criterion (the criterion returned by make_private), whose backward clips each sample."
            )
        if automatic:  # manual optimisation ran its backward already (manual_backward)
            self._dp_loss = loss
        return {**output, "loss": loss.detach()} if isinstance(output, Mapping) else loss.detach()

    def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
        """Lightning's backward (hooks and precision plugin around it) applied to the step's DP loss."""
        if self._dp_loss is None:  # manual optimisation: manual_backward(dp_loss) hands the DP loss itself
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        dp_loss, self._dp_loss = self._dp_loss, None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self.precision_plugin.backward(dp_loss, self.lightning_module, optimizer, *args, **kwargs)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    # -- checkpoints ------------------------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        """The module's state without the DP wrappers' second names for the network's tensors."""
        state = super().lightning_module_state_dict()
        for alias in _wrapper_aliases(self.lightning_module):
            state.pop(alias, None)
        return state

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Loads the weights, the DP wrappers' names included (they name the network's own tensors)."""
        saved = checkpoint["state_dict"]
        state = type(saved)(saved) if isinstance(saved, dict) else dict(saved)
        if hasattr(saved, "_metadata"):
            state._metadata = saved._metadata
        for alias, name in _wrapper_aliases(self.lightning_module).items():
            if alias not in state and name in state:
                state[alias] = state[name]
        self.lightning_module.load_state_dict(state, strict=strict)

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Adds the accountants and the random state of the DP steps to a full checkpoint (not a weights-only one,
        which cannot be resumed)."""
        if "optimizer_states" in checkpoint:
            checkpoint[CHECKPOINT_KEY] = self._dp_state()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """`fit(ckpt_path=...)`: the optimizers, then the accountants and the random state of the DP steps."""
        super().load_optimizer_state_dict(checkpoint)
        self._load_dp_state(checkpoint)

    def _dp_state(self) -> Dict[str, Any]:
        engines = _engines(self.lightning_module)
        state: Dict[str, Any] = {"accountants": {name: dict(e.accountant.state_dict()) for name, e in engines.items()}}
        if not self._secure():
            trainer = self.lightning_module.trainer
            loaders = _poisson_loaders(trainer.train_dataloader) if trainer.train_dataloader is not None else []
            rng = {"cpu": torch.get_rng_state()}
            if self.root_device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.root_device)
            rng["optimizers"] = [
                opt.generator.get_state() if isinstance(opt.generator, torch.Generator) else None
                for opt in self._dp_optimizers()
            ]
            rng["loaders"] = [[g.get_state() for g in _generators(loader)] for loader in loaders]
            state["rng"] = rng
        return state

    def _secure(self) -> bool:
        return any(opt.secure_mode for opt in self._dp_optimizers()) or any(
            e.secure_mode for e in _engines(self.lightning_module).values())

    def _load_dp_state(self, checkpoint: Mapping[str, Any]) -> None:
        engines = _engines(self.lightning_module)
        if not engines and not self._dp_optimizers():
            return
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise ValueError(
                "The checkpoint holds no privacy accountant: it was not written under DPStrategy or DPDDPStrategy, "
                "and resuming from it would start the accounting at ε = 0 for weights already trained. If it is a "
                "non-private starting point (trained on public data), load its weights (load_state_dict or "
                "load_from_checkpoint) and call fit without ckpt_path."
            )
        saved = state["accountants"]
        if set(saved) != set(engines):
            raise ValueError(
                f"The checkpoint holds the accountants of the PrivacyEngine attributes {sorted(saved)}, the "
                f"LightningModule has {sorted(engines)}: keep the engines under the names they were saved with."
            )
        for name, engine in engines.items():
            engine.accountant.load_state_dict(saved[name])
        rng = state.get("rng")
        if rng is None or self._secure():  # secure_mode draws afresh from its CSPRNG
            return
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.root_device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.root_device)
        optimizers = self._dp_optimizers()
        if len(rng["optimizers"]) != len(optimizers):
            raise ValueError(
                f"The checkpoint was written with {len(rng['optimizers'])} DP optimizers, configure_optimizers "
                f"returned {len(optimizers)}: resume with the configuration that wrote it."
            )
        for opt, generator_state in zip(optimizers, rng["optimizers"]):
            if generator_state is not None and isinstance(opt.generator, torch.Generator):
                opt.generator.set_state(generator_state)
        self._pending_loader_rng = list(rng["loaders"])

    def process_dataloader(self, dataloader: object) -> object:
        """Restores a resumed run's Poisson loaders' own generators, before Lightning draws its first batch."""
        dataloader = super().process_dataloader(dataloader)
        if self._pending_loader_rng and isinstance(dataloader, DataLoader) and _is_poisson(dataloader):
            for generator, generator_state in zip(_generators(dataloader), self._pending_loader_rng.pop(0)):
                generator.set_state(generator_state)
        return dataloader


class DPStrategy(_DPTraining, SingleDeviceStrategy):
    """`SingleDeviceStrategy` whose `training_step` may return FlashNorm's DP loss (see the module docstring).

    Args:
        device: the device to train on; by default the one the Trainer picks (its `accelerator` and `devices`:
            the first GPU where there is one, else the CPU).
        accelerator, checkpoint_io, precision_plugin: those of Lightning's `SingleDeviceStrategy`.
    """

    def __init__(self, device: Any = None, **kwargs: Any):
        super().__init__(device="cpu" if device is None else device, **kwargs)
        self._parallel_devices: Optional[List[torch.device]] = None if device is None else [self._root_device]

    @property
    def parallel_devices(self) -> Optional[List[torch.device]]:
        """The devices the Trainer gives (Lightning sets them); the strategy trains on the first."""
        return None if self._parallel_devices is None else [_indexed(d) for d in self._parallel_devices]

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[List[torch.device]]) -> None:
        self._parallel_devices = list(devices) if devices else None

    @property
    def root_device(self) -> torch.device:
        return _indexed(self._parallel_devices[0] if self._parallel_devices else self._root_device)

    def setup(self, trainer) -> None:
        if self._parallel_devices is not None and len(self._parallel_devices) > 1:
            rank_zero_warn(
                f"DPStrategy trains on one device, {self.root_device}, of the {len(self._parallel_devices)} the "
                "Trainer was given: use strategy=DPDDPStrategy() to train on all of them."
            )
        super().setup(trainer)


class DPDDPStrategy(_DPTraining, DDPStrategy):
    """Lightning's `DDPStrategy` for FlashNorm's DP training: one process per device, one DP step over the union
    of the ranks' batches.

    The LightningModule passes `self.trainer.strategy.distribute(net)` to `make_private`: the network in PyTorch's
    `DistributedDataParallel`, which FlashNorm's DDP path runs without DDP's own gradient reduction (each rank
    clips its samples; the DP optimizer adds the noise once, on rank 0, and all-reduces once per step). The
    LightningModule itself is not wrapped in DDP (its parameters are broadcast from rank 0 instead), and
    Lightning does not inject a distributed sampler during `fit`: the training loader `make_private` returns
    samples each rank's share of one Poisson draw that every rank makes alike. Validation loaders are then not
    sharded (each rank evaluates all of them) unless they carry a `DistributedSampler`.

    Refused, before any step: a DP optimizer made for one process (the network was not passed through
    `distribute`), an optimizer that is not FlashNorm's DP optimizer (nothing else would reduce its gradients),
    and a training loader that gives every rank the whole dataset.

    Args: those of Lightning's `DDPStrategy` (its extra keyword arguments go to `DistributedDataParallel`).
    """

    _sampler_flag: Optional[tuple] = None  # (the Trainer's accelerator connector, its use_distributed_sampler)

    def distribute(self, module: nn.Module) -> nn.Module:
        """`module` (on this rank's device) in PyTorch's `DistributedDataParallel`, for `make_private`. Collective:
        call it on every rank."""
        return DistributedDataParallel(module, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)

    def configure_ddp(self) -> None:
        """No DDP around the LightningModule (its reducer would average the gradients that the DP optimizer sums
        after the noise): its parameters and buffers are broadcast from rank 0."""
        _sync_module_states(self.model)

    def setup(self, trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            connector = trainer._accelerator_connector
            self._sampler_flag = (connector, connector.use_distributed_sampler)
            connector.use_distributed_sampler = False  # make_private's loader takes this rank's share itself
        super().setup(trainer)

    def _check_optimizers(self) -> None:
        for opt in self.optimizers:
            if not isinstance(opt, DistributedDPOptimizerFastGradientClipping):
                fix = ("pass module=self.trainer.strategy.distribute(self.net) to make_private"
                       if isinstance(opt, DPOptimizer) else
                       "make it private with FlashNorm's make_private (module=self.trainer.strategy.distribute(...)) "
                       "and one of the modes ghost, flash or flash_fuse")
                raise ValueError(
                    f"DPDDPStrategy steps FlashNorm's DDP optimizer, which clips on each rank, adds the noise once and "
                    f"sums the ranks' gradients; configure_optimizers returned a {type(opt).__name__}, whose step "
                    f"would leave the ranks apart: {fix}."
                )
        super()._check_optimizers()

    def on_train_start(self) -> None:
        for loader in _flatten(self.lightning_module.trainer.train_dataloader):
            if isinstance(loader, DataLoader) and not (
                isinstance(loader.batch_sampler, DistributedUniformWithReplacementSampler)
                or _is_rank_share(loader) or isinstance(loader.sampler, DistributedSampler)
            ):
                raise ValueError(
                    "DPDDPStrategy: the training loader gives every rank the whole dataset, so each sample would be "
                    "used once per rank. Return the data loader make_private returned for the distributed network "
                    "(it samples each rank's share of one Poisson draw), or a loader with a DistributedSampler."
                )
        super().on_train_start()

    def teardown(self) -> None:
        if self._sampler_flag is not None:  # the Trainer's own setting again, for its next fit, validate or test
            connector, flag = self._sampler_flag
            connector.use_distributed_sampler = flag
            self._sampler_flag = None
        super().teardown()


# -- helpers ------------------------------------------------------------------------------------------------------


def _indexed(device: torch.device) -> torch.device:
    """`cuda` without an index is the current CUDA device (`torch.cuda.set_device` needs an index)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _engines(module: nn.Module) -> Dict[str, _OpacusPrivacyEngine]:
    """The `PrivacyEngine` attributes of the LightningModule, by name."""
    return {name: value for name, value in sorted(vars(module).items()) if isinstance(value, _OpacusPrivacyEngine)}


def _wrapper_aliases(module: nn.Module) -> Dict[str, str]:
    """{key through a DP wrapper: the key of the same tensor outside any wrapper} over `module`'s state dict.

    `make_private` returns a wrapper (`dp_net`) around the network the module keeps (`net`): the state dict names
    each weight twice, `net.0.weight` and `dp_net._module.0.weight`.
    """
    modules = dict(module.named_modules(remove_duplicate=False))

    def through_wrapper(key: str) -> bool:
        parts = key.split(".")[:-1]
        return any(isinstance(modules.get(".".join(parts[: i + 1])), _WRAPPERS) for i in range(len(parts)))

    names: Dict[int, List[str]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(key)
    aliases = {}
    for keys in names.values():
        plain = [k for k in keys if not through_wrapper(k)]
        if plain:
            aliases.update({k: plain[0] for k in keys if k not in plain})
    return aliases


def _flatten(loaders: Any) -> List[Any]:
    if isinstance(loaders, Mapping):
        return [leaf for value in loaders.values() for leaf in _flatten(value)]
    if isinstance(loaders, (list, tuple)):
        return [leaf for value in loaders for leaf in _flatten(value)]
    return [] if loaders is None else [loaders]


def _is_poisson(loader: DataLoader) -> bool:
    return isinstance(loader.batch_sampler, _POISSON_SAMPLERS)


def _is_rank_share(loader: DataLoader) -> bool:
    return isinstance(loader.batch_sampler, RankShareSampler)


def _poisson_loaders(loaders: Any) -> List[DataLoader]:
    return [dl for dl in _flatten(loaders) if isinstance(dl, DataLoader) and _is_poisson(dl)]


def _generators(loader: DataLoader) -> List[torch.Generator]:
    """A Poisson loader's own generators (none where it draws from the global generator)."""
    found: List[torch.Generator] = []
    for generator in (getattr(loader.batch_sampler, "generator", None), loader.generator):
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found
