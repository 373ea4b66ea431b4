"""Every clipping mode × layer type × T × reduction × clipping on/off against the float64 oracle."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from tests.conftest import TOLERANCES, fp32_tolerance
from tests.oracle import assert_sequence_first_step_matches_float64, microbatch_reference
from tests.zoo import KINDS, build

# mode, forced norm method (FLASHNORM_NORM_METHOD); None lets the planner choose.
MODES = [
    ("ghost", None),
    ("flash", None),
    ("flash", "flash"),
    ("flash_fuse", None),
    ("flash_fuse", "flash"),
    ("flash_fuse", "gram"),
]
STEPS = (1, 37, 600)


def dp_clipped_step(model, x, y, *, mode, reduction, max_grad_norm, noise_multiplier=0.0, generator=None):
    """One DP step through the public API; returns (wrapped model, gradients the optimizer applied)."""
    engine = FlashNormPrivacyEngine()
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp_model, dp_opt, criterion, _ = engine.make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(reduction=reduction),
        data_loader=loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=False, grad_sample_mode=mode, loss_reduction=reduction, noise_generator=generator,
    )
    loss = criterion(dp_model(x), y)
    loss.backward()
    dp_opt.step()
    return dp_model, {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["fp64", "fp32"])
@pytest.mark.parametrize("clip", ["active", "inactive"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode,method", MODES, ids=[f"{m}-{f or 'auto'}" for m, f in MODES])
def test_step_matches_float64_microbatch(mode, method, kind, steps, reduction, clip, dtype, device, monkeypatch):
    """fp64 runs the DP step on a float64 model: any algorithmic error (a missing term, samples mixed)
    shows far above 1e-10. fp32 is what users run: 1e-5 against the float64 oracle."""
    if kind == "linear2d" and steps != 1:
        pytest.skip("2-D inputs have no sequence dimension")
    if method:
        monkeypatch.setenv("FLASHNORM_NORM_METHOD", method)
    model, x, y = build(kind, steps)
    if dtype == "fp64":
        model, x = model.double(), (x.double() if x.is_floating_point() else x)
    max_grad_norm = 1e-2 if clip == "active" else 1e10

    oracle = microbatch_reference(
        model, x, y, lambda out, target: nn.functional.cross_entropy(out, target, reduction="sum"), max_grad_norm
    )
    dp_model, grads = dp_clipped_step(
        model.to(device), x.to(device), y.to(device), mode=mode, reduction=reduction, max_grad_norm=max_grad_norm
    )
    grads = {name: grad.cpu() for name, grad in grads.items()}

    rtol, atol = TOLERANCES[dtype] if dtype == "fp64" else fp32_tolerance(device)
    torch.testing.assert_close(dp_model.get_norm_sample().double().cpu(), oracle.norms, rtol=rtol, atol=atol)
    if clip == "active":
        assert (oracle.norms > max_grad_norm).all(), "the active case must actually clip every sample"
    scale = x.shape[0] if reduction == "mean" else 1
    failures = []
    for name, grad in grads.items():
        expected = oracle.clipped_sum[name] / scale
        if not torch.allclose(grad.double(), expected, rtol=rtol, atol=atol * max(1.0, float(expected.abs().max()))):
            failures.append(f"{name}: max abs err {float((grad.double() - expected).abs().max()):.3e}")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["ghost", "flash", "flash_fuse"])
def test_single_sample_batch(mode, kind, reduction, device):
    """B = 1: every mode takes one ordinary backward (the batch gradient is the per-sample one)."""
    model, x, y = build(kind, 37, batch=1)
    model, x = model.double(), (x.double() if x.is_floating_point() else x)
    clip = 1e-2
    oracle = microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), clip)
    dp_model, grads = dp_clipped_step(model.to(device), x.to(device), y.to(device), mode=mode, reduction=reduction,
                                      max_grad_norm=clip)
    assert not dp_model.taps, "a batch of one sample needs no capture, no norm pass"
    rtol, atol = TOLERANCES["fp64"]
    # the debugging attribute follows the recorded squared norm when first read (nothing computed it yet)
    torch.testing.assert_close(dp_model.per_sample_gradient_norms.cpu(), oracle.norms, rtol=rtol, atol=atol)
    torch.testing.assert_close(dp_model.get_norm_sample().cpu(), oracle.norms, rtol=rtol, atol=atol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.cpu(), oracle.clipped_sum[name], rtol=rtol, atol=atol)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_single_sample_tail_by_the_multi_tensor_kernels(kind, reduction, steps, device, monkeypatch):
    """B = 1 in float32 with FLASHNORM_BACKEND=triton (the interpreter on CPU): the norm of all gradients and their
    scaling by c are the multi-tensor Triton passes; exact against the float64 oracle."""
    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
    model, x, y = build(kind, steps, batch=1)
    clip = 1e-2
    oracle = microbatch_reference(model.double(), x.double() if x.is_floating_point() else x, y,
                                  lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), clip)
    model = model.float()
    dp_model, grads = dp_clipped_step(model.to(device), x.to(device), y.to(device), mode="flash_fuse",
                                      reduction=reduction, max_grad_norm=clip)
    rtol, atol = fp32_tolerance(device)
    assert (oracle.norms > clip).all(), "clipping must be active"
    torch.testing.assert_close(dp_model.get_norm_sample().double().cpu(), oracle.norms, rtol=rtol, atol=atol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double().cpu(), oracle.clipped_sum[name], rtol=rtol, atol=atol)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize("steps", (1, 37))
@pytest.mark.parametrize("mode", ["flash", "flash_fuse"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_normalisation_layers_by_the_affine_norm_kernel(kind, mode, steps, device, monkeypatch):
    """FLASHNORM_BACKEND=triton (the interpreter on CPU): the normalisation layer's per-sample gradients come from
    the one-pass kernel, into their packed slots; norms and clipped gradients exact against the float64 oracle."""
    from flashnorm.kernels import affine_norm

    monkeypatch.setenv("FLASHNORM_BACKEND", "triton")
    calls = []
    kernel = affine_norm.affine_norm_grads_triton
    monkeypatch.setattr(affine_norm, "affine_norm_grads_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model, x, y = build(kind, steps)
    clip = 1e-2
    oracle = microbatch_reference(model.double(), x.double(), y,
                                  lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), clip)
    dp_model, grads = dp_clipped_step(model.float().to(device), x.float().to(device), y.to(device), mode=mode,
                                      reduction="mean", max_grad_norm=clip)
    assert calls == [1], "the normalisation layer goes through the kernel once per step"
    rtol, atol = fp32_tolerance(device)
    torch.testing.assert_close(dp_model.get_norm_sample().double().cpu(), oracle.norms, rtol=rtol, atol=atol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double().cpu(), oracle.clipped_sum[name] / x.shape[0], rtol=rtol, atol=atol)


class _SeqFirstAttention(nn.Module):
    """Opacus's DPMultiheadAttention in its default layout: inputs [T, B, d] (batch_first=False)."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        from opacus.layers import DPMultiheadAttention

        self.inp = nn.Linear(6, d)
        self.attn = DPMultiheadAttention(d, num_heads=2)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: [T, B, 6]; every hooked layer sees [T, B, ...]
        h = self.inp(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0]).mean(dim=0)


@pytest.mark.parametrize("mode", ["ghost", "flash", "flash_fuse"])
def test_sequence_first_inputs(mode):
    """batch_first=False ([T, B, ...], Opacus's DPMultiheadAttention default) against the oracle."""
    torch.manual_seed(0)
    model = _SeqFirstAttention().double()
    x, y = torch.randn(37, 3, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    assert_sequence_first_step_matches_float64(model, x, y, mode)


class _FoldsPairs(nn.Module):
    """Takes [1, 2·n, d] and runs its layers on [2, n, d]: the first argument's batch dimension (1) is not the
    layers' (2)."""

    def __init__(self, d: int, classes: int):
        super().__init__()
        self.lin, self.head = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x.reshape(2, -1, x.shape[-1]))).mean(dim=1))


@pytest.mark.parametrize("mode", ["flash", "flash_fuse"])
def test_batch_sizes_changing_between_steps_park_and_restore_the_forward_hooks(mode):
    """B = 1, 1, 1, 3, 1, 1: a step of one sample whose first argument was seen to carry the layers' batch size runs
    without forward hooks (nothing to capture); the hooks come back for B = 3; every step is exact."""
    torch.manual_seed(0)
    model, x_all, y_all = build("linear3d", 37, batch=3)
    model = model.double()
    x_all = x_all.double()
    clip = 1e-2
    batches = [(x_all[i % 3: i % 3 + b], y_all[i % 3: i % 3 + b]) for i, b in enumerate((1, 1, 1, 3, 1, 1))]
    oracles = [microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), clip)
               for x, y in batches]  # before wrapping: no optimizer step runs, so the weights stay these
    dp_model, dp_opt, criterion, _ = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=nn.CrossEntropyLoss(reduction="sum"),
        data_loader=DataLoader(TensorDataset(x_all, y_all), batch_size=3), noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode=mode, loss_reduction="sum",
    )
    hooked = []
    for (x, y), oracle in zip(batches, oracles):
        loss = criterion(dp_model(x), y)
        hooked.append(all(layer.handles for layer in dp_model.layers))
        loss.backward()
        rtol, atol = TOLERANCES["fp64"]
        torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=rtol, atol=atol)
        for name, p in dp_model._module.named_parameters():
            torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=rtol, atol=atol)
        dp_opt.zero_grad()
    # the first B = 1 step verifies the first argument against the layers; B = 3 needs the hooks, and so does the
    # first B = 1 step after it
    assert hooked == [True, False, False, True, True, False]


def test_a_first_argument_that_does_not_carry_the_batch_keeps_the_hooks():
    """[1, 6, d] folded into two samples: the first argument's batch size (1) never agrees with the layers' (2), so
    the hooks stay on at every step and the norms stay per sample."""
    torch.manual_seed(0)
    model = _FoldsPairs(4, 3).double()
    x, y = torch.randn(1, 6, 4, dtype=torch.float64), torch.tensor([0, 2])
    # the privacy units are the two folded rows: the oracle runs the layers on one row at a time
    oracle = microbatch_reference(model, x.reshape(2, 3, 4), y, lambda o, t: nn.functional.cross_entropy(
        o, t, reduction="sum"), 1e-2, forward=lambda m, row: m.head(torch.tanh(m.lin(row)).mean(dim=1)))
    dp_model, dp_opt, criterion, _ = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=nn.CrossEntropyLoss(reduction="sum"),
        data_loader=DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2), noise_multiplier=0.0, max_grad_norm=1e-2,
        poisson_sampling=False, grad_sample_mode="flash_fuse", loss_reduction="sum",
    )
    for _ in range(3):
        criterion(dp_model(x), y).backward()
        assert all(layer.handles for layer in dp_model.layers)
        torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)
        for name, p in dp_model._module.named_parameters():
            torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)
        dp_opt.zero_grad()
