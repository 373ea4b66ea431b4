"""What the spawned ranks of ``test_lightning_ddp.py`` run: Lightning's Trainer with ``DPDDPStrategy``, devices=2.

Each rank has the variables a launcher (``torchrun``, or Lightning's own for the rank it starts) sets
(``tests.integrations.ranks`` sets them), so the Trainer joins the two processes instead of starting more; it trains
every case in order and saves ``{case: {...}}`` to ``<out>/rank<r>.pt`` for the test. On the CPU by default (gloo); with
``FLASHNORM_DIST_BACKEND=nccl`` on 2 GPUs (``accelerator="gpu"``, NCCL), as ``tests/distributed`` does.
"""

from __future__ import annotations

import os
import traceback

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import PrivacyEngine
from flashnorm.integrations.lightning import DPDDPStrategy

WORLD = 2
BACKEND = os.environ.get("FLASHNORM_DIST_BACKEND", "gloo")
ACCELERATOR = "gpu" if BACKEND == "nccl" else "cpu"
N, CLIP, LR = 16, 1.9, 0.5
EXACT_BATCH = 8  # q = 1/2: one step of noise 0 checked against the float64 reference
NOISY_BATCH, SIGMA = 4, 0.8  # q = 1/4: 4 steps an epoch


def dataset() -> TensorDataset:
    """Sequences [N, 5, 6], labels, and each sample's index (to see which rank used which sample)."""
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(N, 5, 6, generator=g), torch.randint(0, 4, (N,), generator=g), torch.arange(N))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


def sample_loss(out, target):
    """ℓ_b of one sample from the network's output [1, 5, 4] (mean over positions, cross-entropy)."""
    return nn.functional.cross_entropy(out.mean(dim=1), target)


class Classifier(L.LightningModule):
    """The documented DP LightningModule; records each step's share of samples and what the DP optimizer applied."""

    def __init__(self, sigma=0.0, batch=EXACT_BATCH, distribute=True, dp_loader=True):
        super().__init__()
        self.net, self.engine = net(), PrivacyEngine(accountant="rdp")
        self.sigma, self.batch, self.distribute, self.dp_loader = sigma, batch, distribute, dp_loader
        self.shares, self.applied = [], []

    def configure_optimizers(self):
        module = self.trainer.strategy.distribute(self.net) if self.distribute else self.net
        self.dp_net, optimizer, self.criterion, self.loader = self.engine.make_private(
            module=module, optimizer=torch.optim.SGD(self.net.parameters(), lr=LR), criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(dataset(), batch_size=self.batch), noise_multiplier=self.sigma,
            max_grad_norm=CLIP, grad_sample_mode="flash_fuse",
        )
        return optimizer

    def train_dataloader(self):
        return self.loader if self.dp_loader else DataLoader(dataset(), batch_size=self.batch)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.shares.append(index.cpu().clone())
        return self.criterion(self.dp_net(x).mean(dim=1), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # (Σ_r Σ_b c_b ∇ℓ_b + noise) / B_expected, left in p.grad by the DP optimizer's step
        self.applied.append({name: p.grad.detach().cpu().clone() for name, p in self.net.named_parameters()})


def params(module: nn.Module) -> dict:
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters()}


def fit(module, ckpt_path=None, **trainer_args) -> L.Trainer:
    args = dict(accelerator=ACCELERATOR, devices=WORLD, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer = L.Trainer(strategy=DPDDPStrategy(), **{**args, **trainer_args})
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def summary(module: Classifier, trainer: L.Trainer, before: dict) -> dict:
    optimizer = trainer.strategy.optimizers[0]
    return {
        "world_size": trainer.world_size, "global_rank": trainer.global_rank,
        "classes": (type(module.dp_net).__name__, type(module.dp_net._module).__name__, type(optimizer).__name__),
        "loader_sampler": type(trainer.train_dataloader.batch_sampler).__name__,
        "device": str(trainer.strategy.root_device),
        "shares": module.shares, "applied": module.applied, "before": before, "params": params(module.net),
        "history": list(module.engine.accountant.history), "epsilon": module.engine.get_epsilon(1e-5),
    }


def seeded(**kwargs) -> tuple:
    """What a script does: seed, then build the module (the same seed on every rank, as seed_everything makes it)."""
    L.seed_everything(0, verbose=False)
    module = Classifier(**kwargs)
    return module, params(module.net)


def exact() -> dict:
    """One Poisson step at noise 0."""
    module, before = seeded()
    return summary(module, fit(module, max_steps=1), before)


def noisy() -> dict:
    """Two epochs (8 steps) with noise."""
    module, before = seeded(sigma=SIGMA, batch=NOISY_BATCH)
    return summary(module, fit(module, max_epochs=2), before)


def resumed(out_dir: str) -> dict:
    """One epoch saved by ModelCheckpoint, then a fresh module and Trainer resuming from it for the second."""
    module, before = seeded(sigma=SIGMA, batch=NOISY_BATCH)
    fit(module, max_epochs=1, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=out_dir, save_last=True)])
    first_epoch = list(module.engine.accountant.history)
    module, _ = seeded(sigma=SIGMA, batch=NOISY_BATCH)
    trainer = fit(module, max_epochs=2, ckpt_path=os.path.join(out_dir, "last.ckpt"))
    return {**summary(module, trainer, before), "first_epoch_history": first_epoch}


def refused(**kwargs) -> dict:
    """A misconfigured module: the error every rank raises, and whether any parameter changed."""
    module, before = seeded(**kwargs)
    try:
        fit(module, max_steps=1)
    except ValueError as error:
        return {"error_message": str(error), "unchanged": all(torch.equal(p, before[n]) for n, p in
                                                               params(module.net).items()),
                "history": list(module.engine.accountant.history)}
    return {"error_message": None}


def run(rank: int, out_dir: str) -> None:
    """Body of every rank (in the launcher's environment ``tests.integrations.ranks`` sets): every case; results to
    ``out_dir/rank<r>.pt``."""
    cases = [
        ("exact", exact),
        ("noisy", noisy),
        ("resumed", lambda: resumed(os.path.join(out_dir, "ckpt"))),
        ("not_distributed", lambda: refused(distribute=False)),
        ("whole_dataset", lambda: refused(dp_loader=False)),
    ]
    results = {}
    for name, case in cases:
        try:
            results[name] = case()
        except Exception:  # noqa: BLE001 - reported by the test of that case
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
