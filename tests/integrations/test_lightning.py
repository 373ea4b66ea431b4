"""Lightning with FlashNorm: automatic optimisation through DPStrategy, and manual optimisation, against the
float64 per-sample reference."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import TOLERANCES
from tests.oracle import microbatch_reference

L = pytest.importorskip("lightning")

from flashnorm import PrivacyEngine  # noqa: E402
from flashnorm.integrations.lightning import DPStrategy  # noqa: E402

B, CLIP, LR = 8, 1.85, 1.0


def data():
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(B, 5, 6, generator=g), torch.randint(0, 4, (B,), generator=g))


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


class Classifier(L.LightningModule):
    """A sequence classifier (mean over the 5 positions) trained with DP; ``returns`` picks what training_step
    hands Lightning."""

    def __init__(self, returns="loss", automatic=True, accumulate=1):
        super().__init__()
        self.net, self.returns, self.automatic_optimization = net(), returns, automatic
        self.accumulate = accumulate  # batches per step: the data loader's batch is B / accumulate
        self.engine = PrivacyEngine(accountant="rdp")

    def configure_optimizers(self):
        self.dp_net, optimizer, self.criterion, self.loader = self.engine.make_private(
            module=self.net, optimizer=torch.optim.SGD(self.net.parameters(), lr=LR), criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(data(), batch_size=B // self.accumulate), noise_multiplier=0.0, max_grad_norm=CLIP,
            poisson_sampling=False, grad_sample_mode="flash_fuse",
        )
        return optimizer

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self.dp_net(x).mean(dim=1), y)
        if self.returns == "plain":
            return loss.detach()
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.log("train_loss", loss.detach())
        return {"loss": loss} if self.returns == "dict" else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # what the DP optimizer applied: (Σ_b c_b ∇ℓ_b + noise) / B, left in p.grad by its step
        self.applied = {name: p.grad.detach().clone() for name, p in self.net.named_parameters()}


def fit(module, **trainer_args):
    args = dict(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    args.update(trainer_args)
    L.Trainer(strategy=DPStrategy(), **args).fit(module)


def reference_grad(model):
    x, y = data().tensors
    oracle = microbatch_reference(
        model, x, y, lambda out, target: nn.functional.cross_entropy(out, target), CLIP,
        forward=lambda m, xb: m(xb).mean(dim=1),
    )
    assert (oracle.norms > CLIP).any() and (oracle.norms < CLIP).any()
    return {name: g / B for name, g in oracle.clipped_sum.items()}


@pytest.mark.parametrize(
    "returns, automatic, accumulate", [("loss", True, 1), ("dict", True, 1), ("loss", False, 1), ("loss", True, 2)]
)
def test_one_step_is_the_clipped_mean(returns, automatic, accumulate):
    module = Classifier(returns, automatic, accumulate)
    before = copy.deepcopy(module.net)
    expected = reference_grad(before)
    fit(module, accumulate_grad_batches=accumulate)
    rtol, atol = TOLERANCES["fp32"]
    for name, p in module.net.named_parameters():
        torch.testing.assert_close(module.applied[name].double(), expected[name], rtol=rtol, atol=atol, msg=name)
        torch.testing.assert_close(p, before.get_parameter(name) - LR * module.applied[name], msg=name)  # SGD
    assert module.engine.accountant.history == [(0.0, 1.0, 1)]


def test_refuses_a_plain_loss_and_a_second_clip():
    with pytest.raises(TypeError, match="DP criterion"):
        fit(Classifier("plain"))
    with pytest.raises(ValueError, match="gradient_clip_val"):
        fit(Classifier(), gradient_clip_val=1.0)
