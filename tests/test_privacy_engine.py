"""The public workflow: modes, privacy invariants, accounting, checkpoints and clear errors."""

import copy
import io

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine as OpacusPrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine, PrivacyEngine, valid_mode_names
from flashnorm.grad_sample import GradSampleModuleFastGradientClippingFuse
from tests.conftest import CLIPPING_MODES
from tests.oracle import microbatch_reference


def small_model(d=6, h=5, classes=3):
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, classes))


def private(model, *, mode, x=None, y=None, sigma=0.0, clip=1.0, reduction="mean", generator=None,
            poisson=False, batch_size=4, n=16, engine=None, optimizer=None):
    x = torch.randn(n, 6) if x is None else x
    y = torch.randint(0, 3, (x.shape[0],)) if y is None else y
    engine = engine or FlashNormPrivacyEngine()
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    dp_model, dp_opt, criterion, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(reduction=reduction), data_loader=loader,
        noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=poisson, grad_sample_mode=mode,
        loss_reduction=reduction, noise_generator=generator,
    )
    return engine, dp_model, dp_opt, criterion, dp_loader


def one_step(dp_model, dp_opt, criterion, x, y):
    loss = criterion(dp_model(x), y)
    loss.backward()
    dp_opt.step()
    dp_opt.zero_grad()
    return loss


def test_public_names():
    assert PrivacyEngine is FlashNormPrivacyEngine and issubclass(FlashNormPrivacyEngine, OpacusPrivacyEngine)
    from flashnorm.criterion import DPLossFastGradientClipping as Criterion
    from flashnorm.grad_sample import GradSampleModuleFastGradientClipping  # noqa: F401
    from flashnorm.grad_sample import GradSampleModuleFastGradientClippingFuse  # noqa: F401
    from flashnorm.optimizers import DPOptimizerFastGradientClipping  # noqa: F401
    from flashnorm.privacy_engine import FlashNormPrivacyEngine as Same
    from flashnorm.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    assert Same is FlashNormPrivacyEngine
    assert DPLossFastGradientClipping is Criterion, "the seed's import path re-exports the criterion"


def test_unknown_mode_lists_every_valid_mode():
    with pytest.raises(ValueError) as err:
        private(small_model(), mode="flashy")
    for name in valid_mode_names():
        assert name in str(err.value)
    assert "flash_bk" in str(err.value) and "hooks" in str(err.value)


@pytest.mark.parametrize("mode", ["ghost_fsdp", "flash_fsdp", "flash_fuse_fsdp"])
def test_fsdp_modes_need_an_fsdp2_module(mode):  # they run under FSDP2: tests/distributed
    with pytest.raises(ValueError, match="FSDP2Wrapper"):
        private(small_model(), mode=mode)


def test_flash_bk_is_flash_fuse():
    _, dp_model, *_ = private(small_model(), mode="flash_bk")
    assert isinstance(dp_model, GradSampleModuleFastGradientClippingFuse)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_modes_are_delegated(mode):
    engine = FlashNormPrivacyEngine()
    model = small_model()
    loader = DataLoader(TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,))), batch_size=4)
    out = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
                              noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode=mode)
    assert len(out) == 3 and type(out[0]).__module__.startswith("opacus")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_no_noise_no_clipping_equals_plain_sgd(mode, reduction):
    model = small_model()
    plain = copy.deepcopy(model)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, x=x, y=y, clip=1e10, reduction=reduction, n=4)
    one_step(dp_model, dp_opt, criterion, x, y)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.5)
    nn.functional.cross_entropy(plain(x), y, reduction=reduction).backward()
    sgd.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_noise_std_is_sigma_c_over_b_and_added_once(mode):
    torch.manual_seed(1)
    width, batch, sigma, clip = 256, 4, 0.7, 0.3
    x, y = torch.randn(batch, width), torch.randint(0, 3, (batch,))

    def grads_after_step(noise):
        model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))
        torch.manual_seed(2)
        model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        gen = torch.Generator().manual_seed(3)
        _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, x=x, y=y, sigma=noise, clip=clip, n=batch,
                                                    batch_size=batch, generator=gen)
        criterion(dp_model(x), y).backward()
        dp_opt.step()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    noise = grads_after_step(sigma) - grads_after_step(0.0)
    assert noise.numel() >= 50_000
    expected = sigma * clip / batch
    assert abs(noise.std().item() / expected - 1) < 0.05
    assert abs(noise.mean().item()) < 0.05 * expected


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_noise_generator_seed_reproduces_a_run(mode):
    def run(seed):
        torch.manual_seed(0)
        model = small_model()
        x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
        _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, x=x, y=y, sigma=1.0, n=4,
                                                    generator=torch.Generator().manual_seed(seed))
        for _ in range(2):
            one_step(dp_model, dp_opt, criterion, x, y)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_empty_poisson_batch(mode):
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, sigma=0.0, poisson=True)
    x, y = torch.randn(0, 6), torch.zeros(0, dtype=torch.long)
    one_step(dp_model, dp_opt, criterion, x, y)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    # and with noise every parameter still moves (noise is added to empty batches too)
    _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, sigma=1.0, poisson=True)
    one_step(dp_model, dp_opt, criterion, x, y)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_poisson_loader_trains_and_epsilon_equals_opacus(mode):
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def train(engine, mode):
        model = small_model()
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        out = engine.make_private(module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                                  data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0, grad_sample_mode=mode)
        dp_model, dp_opt, dp_loader = out[0], out[1], out[-1]
        for xb, yb in dp_loader:
            if mode == "hooks":
                nn.functional.cross_entropy(dp_model(xb), yb).backward()
            else:
                out[2](dp_model(xb), yb).backward()
            dp_opt.step()
            dp_opt.zero_grad()
        return engine.get_epsilon(1e-5)

    eps_ours = train(FlashNormPrivacyEngine(accountant="rdp"), mode)
    eps_opacus = train(OpacusPrivacyEngine(accountant="rdp"), "hooks")
    assert eps_ours > 0 and eps_ours == pytest.approx(eps_opacus, rel=1e-12)


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_checkpoint_round_trip_resumes_with_same_epsilon(mode):
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    engine, dp_model, dp_opt, criterion, _ = private(small_model(), mode=mode, x=x, y=y, sigma=1.0, poisson=True)
    for _ in range(3):
        one_step(dp_model, dp_opt, criterion, x[:4], y[:4])
    buffer = io.BytesIO()
    engine.save_checkpoint(path=buffer, module=dp_model, optimizer=dp_opt)
    buffer.seek(0)
    engine2, dp_model2, dp_opt2, criterion2, _ = private(small_model(), mode=mode, x=x, y=y, sigma=1.0, poisson=True)
    engine2.load_checkpoint(path=buffer, module=dp_model2, optimizer=dp_opt2)
    assert engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5) > 0
    for p, q in zip(dp_model.parameters(), dp_model2.parameters()):
        assert torch.equal(p, q)
    one_step(dp_model2, dp_opt2, criterion2, x[:4], y[:4])
    assert engine2.get_epsilon(1e-5) > engine.get_epsilon(1e-5)


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_make_private_with_epsilon(mode):
    model = small_model()
    engine = FlashNormPrivacyEngine()
    loader = DataLoader(TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,))), batch_size=8)
    dp_model, dp_opt, criterion, dp_loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        data_loader=loader, target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0, grad_sample_mode=mode)
    for _ in range(2):
        for xb, yb in dp_loader:
            one_step(dp_model, dp_opt, criterion, xb, yb)
    assert engine.get_epsilon(1e-5) == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_frozen_parameters_never_change_and_optimizer_keeps_user_parameters(mode):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    frozen = [p.detach().clone() for p in (model[0].weight, model[2].weight, model[2].bias)]
    params_before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, x=x, y=y, sigma=1.0, n=4, optimizer=optimizer)
    trainable_before = model[3].weight.detach().clone()
    for _ in range(2):
        one_step(dp_model, dp_opt, criterion, x, y)
    assert all(p is q for p, q in zip(dp_model.parameters(), params_before))
    assert dp_opt.original_optimizer is optimizer
    for p, q in zip((model[0].weight, model[2].weight, model[2].bias), frozen):
        assert torch.equal(p, q) and p.grad is None
    assert not torch.equal(model[3].weight, trainable_before)


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_per_sample_loss_with_wrong_batch_size_is_a_clear_error(mode):
    vocab = 5
    model = nn.Sequential(nn.Embedding(vocab, 4), nn.Linear(4, vocab))
    x = torch.randint(0, vocab, (3, 8))
    _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, x=x, y=torch.zeros(3, dtype=torch.long), n=3)
    logits = dp_model(x)
    with pytest.raises(ValueError, match=r"shape=\(B, T, V\)"):
        criterion(logits.reshape(-1, vocab), x.reshape(-1)).backward()


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_non_finite_loss_is_an_error_and_changes_nothing(mode):
    model = small_model()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    _, dp_model, dp_opt, criterion, _ = private(model, mode=mode, x=x, y=y, sigma=0.0, n=4)
    before = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        criterion(dp_model(bad), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    one_step(dp_model, dp_opt, criterion, x, y)  # training state intact: the next step works
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class _Buffered(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(6))
        self.register_buffer("running", torch.zeros(6))

    def forward(self, x):
        return x * self.weight + self.running


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_unsupported_layer_error_names_its_path(mode):
    model = nn.Sequential(nn.Linear(6, 6), nn.Sequential(_Buffered()), nn.Linear(6, 3))
    with pytest.raises(NotImplementedError, match=r"Layer '1\.0' \(_Buffered\)"):
        private(model, mode=mode)


def test_to_standard_module_removes_hooks():
    model = small_model()
    _, dp_model, *_ = private(model, mode="flash_fuse")
    assert dp_model.to_standard_module() is model
    assert all(not layer.handles for layer in dp_model.layers)


@pytest.mark.parametrize("physical", [5, 11])  # 11: the last physical batch holds one sample
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_batch_memory_manager_virtual_steps_equal_one_logical_step(mode, physical):
    """Opacus's BatchMemoryManager splits a logical batch into physical ones: the step is the logical one."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    torch.manual_seed(3)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    model = small_model().double()
    clip = 0.05
    oracle = microbatch_reference(model, x.double(), y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"),
                                  clip)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = FlashNormPrivacyEngine()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(x.double(), y), batch_size=12)
    dp_model, dp_opt, criterion, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode)
    with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=physical, optimizer=dp_opt) as physical:
        for xb, yb in physical:
            criterion(dp_model(xb), yb).backward()
            dp_opt.step()
            dp_opt.zero_grad()
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), oracle.clipped_sum[name] / 12, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_sum_reduction_with_the_default_criterion(mode):
    """loss_reduction="sum" without a criterion: the default cross-entropy takes that reduction (Opacus's default
    criterion, a mean, would fail its reduction check)."""
    torch.manual_seed(0)
    model = small_model().double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    oracle = microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), 0.1)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    dp_model, dp_opt, criterion, _ = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=0.1, poisson_sampling=False, grad_sample_mode=mode, loss_reduction="sum",
    )
    criterion(dp_model(x), y).backward()
    dp_opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), start[name] - oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)


def test_a_criterion_whose_reduction_disagrees_is_a_clear_error():
    model = small_model()
    with pytest.raises(ValueError, match="reduction='mean' but loss_reduction='sum'"):
        FlashNormPrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(TensorDataset(torch.randn(4, 6)), batch_size=2), noise_multiplier=0.0,
            max_grad_norm=1.0, grad_sample_mode="flash", loss_reduction="sum",
        )
