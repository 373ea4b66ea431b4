"""Lightning with FlashNorm on one device: automatic optimisation through DPStrategy, and manual optimisation,
against the float64 per-sample reference; the Trainer's device; checkpoints and resuming.

The Trainers here keep Lightning's default accelerator ("auto") unless a test is about another: on a CUDA host
they train on the GPU (fp32 compared at the GPU's tf32 tolerance), elsewhere on the CPU."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import fp32_tolerance
from tests.oracle import microbatch_reference

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from flashnorm import PrivacyEngine  # noqa: E402
from flashnorm.integrations.lightning import CHECKPOINT_KEY, DPStrategy  # noqa: E402

B, CLIP, LR = 8, 1.85, 1.0
AUTO_DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def data(n=B):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 5, 6, generator=g), torch.randint(0, 4, (n,), generator=g))


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
        # where it trained (Lightning's teardown moves the module back to the CPU after fit)
        self.trained_on = {name: p.device for name, p in self.net.named_parameters()}


TRAINER_ARGS = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0)


def fit(module, strategy=None, ckpt_path=None, **trainer_args):
    trainer = L.Trainer(strategy=strategy or DPStrategy(), **{**TRAINER_ARGS, "max_steps": 1, **trainer_args})
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


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
    rtol, atol = fp32_tolerance(AUTO_DEVICE)
    for name, p in module.net.named_parameters():
        assert module.trained_on[name] == AUTO_DEVICE, name  # the Trainer's device: the GPU where there is one
        applied = module.applied[name].cpu()
        torch.testing.assert_close(applied.double(), expected[name], rtol=rtol, atol=atol, msg=name)
        torch.testing.assert_close(p.cpu(), before.get_parameter(name) - LR * applied, msg=name)  # SGD
    assert module.engine.accountant.history == [(0.0, 1.0, 1)]


def test_refuses_a_plain_loss_and_a_second_clip():
    with pytest.raises(TypeError, match="DP criterion"):
        fit(Classifier("plain"))
    with pytest.raises(ValueError, match="gradient_clip_val"):
        fit(Classifier(), gradient_clip_val=1.0)


# -- devices ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accelerator", ["auto", "cpu"])
def test_trains_on_the_trainers_device(accelerator):
    """No device given: DPStrategy trains where the Trainer's accelerator says (auto: the first GPU if any)."""
    expected = AUTO_DEVICE if accelerator == "auto" else torch.device("cpu")
    module = Classifier()
    trainer = fit(module, accelerator=accelerator)
    assert trainer.strategy.root_device == expected
    assert set(module.trained_on.values()) == {expected}
    assert module.engine.accountant.history == [(0.0, 1.0, 1)]  # it stepped


def test_an_explicit_device_picks_the_accelerator():
    strategy = DPStrategy(device="cpu")
    module = Classifier()
    trainer = fit(module, strategy)  # accelerator "auto" follows the strategy's device
    assert trainer.strategy.root_device == torch.device("cpu")
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"
    assert {d.type for d in module.trained_on.values()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_without_an_index_is_the_current_gpu():
    module = Classifier()
    trainer = fit(module, DPStrategy(device="cuda"))
    assert trainer.strategy.root_device == torch.device("cuda", torch.cuda.current_device())
    assert module.engine.accountant.history == [(0.0, 1.0, 1)]


def test_several_devices_warn_and_train_on_the_first():
    module = Classifier()
    with pytest.warns(UserWarning, match="DPDDPStrategy"):
        trainer = fit(module, accelerator="cpu", devices=2)
    assert trainer.strategy.root_device == torch.device("cpu") and trainer.world_size == 1
    assert module.engine.accountant.history == [(0.0, 1.0, 1)]


# -- checkpoints and resuming ---------------------------------------------------------------------------------------

N, BATCH, SIGMA, DELTA = 16, 4, 0.7, 1e-5  # Poisson q = 4 / 16: 4 steps an epoch


class Noisy(L.LightningModule):
    """DP training as documented (``self.dp_net, optimizer, self.criterion, self.loader = make_private(...)``):
    Poisson sampling, noise, SGD with momentum (optimizer state)."""

    def __init__(self, keep_engine=True):
        super().__init__()
        self.net = net()
        engine = PrivacyEngine(accountant="rdp")
        if keep_engine:
            self.engine = engine
        self._engine = lambda: engine  # not an attribute Lightning or the strategy sees

    def configure_optimizers(self):
        self.dp_net, optimizer, self.criterion, self.loader = self._engine().make_private(
            module=self.net, optimizer=torch.optim.SGD(self.net.parameters(), lr=0.5, momentum=0.9),
            criterion=nn.CrossEntropyLoss(), data_loader=DataLoader(data(N), batch_size=BATCH),
            noise_multiplier=SIGMA, max_grad_norm=CLIP, grad_sample_mode="flash_fuse",
        )
        return optimizer

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.criterion(self.dp_net(x).mean(dim=1), y)


def run(epochs, ckpt_path=None, **trainer_args):
    """A fresh process's run: the script seeds, builds the module and fits (resuming from ``ckpt_path``)."""
    L.seed_everything(0, verbose=False)
    module = Noisy()
    trainer = L.Trainer(strategy=DPStrategy(), max_epochs=epochs, **{**TRAINER_ARGS, **trainer_args})
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def params(module):
    return {name: p.detach().cpu().clone() for name, p in module.net.named_parameters()}


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """One epoch saved by ModelCheckpoint (``last.ckpt``), and two epochs without a break."""
    path = tmp_path_factory.mktemp("lightning_ckpt")
    first, _ = run(1, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=path, save_last=True)])
    whole, _ = run(2)
    return path / "last.ckpt", first, whole


def test_resuming_continues_epsilon_and_the_steps(checkpointed):
    ckpt, first, whole = checkpointed
    resumed, trainer = run(2, ckpt_path=ckpt)
    q = BATCH / N
    assert first.engine.accountant.history == [(SIGMA, q, 4)]
    assert whole.engine.accountant.history == [(SIGMA, q, 8)]
    assert resumed.engine.accountant.history == [(SIGMA, q, 8)]  # goes on from the checkpoint's 4 steps
    assert resumed.engine.get_epsilon(DELTA) == whole.engine.get_epsilon(DELTA) > first.engine.get_epsilon(DELTA)
    assert trainer.global_step == 8
    # the same 4 further steps: the checkpoint's weights and momentum, and the noise and the Poisson batches going
    # on from the checkpoint's random state although the run seeded again (restarting them would repeat epoch 1's)
    rtol, atol = fp32_tolerance(AUTO_DEVICE)
    for name, p in params(resumed).items():
        torch.testing.assert_close(p, params(whole)[name], rtol=rtol, atol=atol, msg=name)
        assert not torch.allclose(p, params(first)[name]), name  # it did train after the checkpoint
    assert resumed.dp_net._module is resumed.net  # the DP module wraps the restored network


def test_checkpoints_hold_the_network_once_and_the_accountant(checkpointed):
    ckpt, first, _ = checkpointed
    checkpoint = torch.load(ckpt, weights_only=False)
    assert sorted(checkpoint["state_dict"]) == sorted(f"net.{name}" for name in first.net.state_dict())
    assert checkpoint[CHECKPOINT_KEY]["accountants"] == {"engine": first.engine.accountant.state_dict()}
    loaded = Noisy.load_from_checkpoint(ckpt)  # a fresh module, strict: no DP wrapper's names in the way
    for name, p in params(loaded).items():
        assert torch.equal(p, params(first)[name]), name


def test_resuming_refuses_a_checkpoint_without_the_accountant(checkpointed, tmp_path):
    ckpt, first, _ = checkpointed
    checkpoint = torch.load(ckpt, weights_only=False)
    del checkpoint[CHECKPOINT_KEY]
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="no privacy accountant"):
        run(2, ckpt_path=tmp_path / "plain.ckpt")


def test_refuses_an_engine_checkpoints_cannot_find():
    module = Noisy(keep_engine=False)
    with pytest.raises(ValueError, match="PrivacyEngine attribute"):
        fit(module)
    assert len(module._engine().accountant) == 0
