"""CudaGraphStep: graphed DP steps against the float64 microbatch oracle, replays with new data and
updated parameters, new batch shapes, the loss check, and its refusals."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from flashnorm.cuda_graphs import CudaGraphStep
from tests.conftest import TOLERANCES
from tests.grad_sample.test_capture_autocast import VOCAB, TinyLM, _rel
from tests.oracle import microbatch_reference
from tests.zoo import build

KINDS = ("linear3d", "layernorm", "embedding", "conv1d", "hf_conv1d", "dp_mha", "fallback", "shared_position")


def _sample_loss(out, target):
    return nn.functional.cross_entropy(out, target, reduction="sum")


def _private(model, x, y, mode, reduction="mean", max_grad_norm=1e-2):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return FlashNormPrivacyEngine().make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(reduction=reduction),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=x.shape[0]), noise_multiplier=0.0,
        max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode, loss_reduction=reduction,
    )


def _graphed(kind, mode, device):
    """A model of ``kind`` (T = 37) made private with ``mode`` and its graphed step:
    (model, x, y, dp_model, dp_opt, step), the batch on the CPU."""
    model, x, y = build(kind, 37)
    model = model.to(device)
    dp_model, dp_opt, criterion, _ = _private(model, x, y, mode)
    step = CudaGraphStep(dp_model, lambda xb, yb: criterion(dp_model(xb), yb))
    return model, x, y, dp_model, dp_opt, step


def _batches(kind, steps, batch, count, dtype, device):
    out = []
    for _ in range(count):
        _, x, y = build(kind, steps, batch=batch)
        x = x.to(dtype) if x.is_floating_point() else x
        out.append((x.to(device), y.to(device)))
    return out


def _hook_free_copy(model):
    """The model's parameters now, in a module without FlashNorm's hooks (a deep copy of a wrapped
    model would carry them), on the CPU for the oracle."""
    twin = copy.deepcopy(model._module if hasattr(model, "_module") else model)
    twin._forward_hooks.clear()
    for m in twin.modules():
        m._forward_hooks.clear()
    return twin.cpu()


def _check_step_against_oracle(model, dp_model, dp_opt, step, x, y, reduction, clip, tol):
    """One graphed step: the gradients the optimizer applies and the norms equal the float64 oracle's."""
    oracle = microbatch_reference(_hook_free_copy(model), x.cpu(), y.cpu(), _sample_loss, clip)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(x, y)
    dp_opt.step()
    rtol, atol = tol
    torch.testing.assert_close(dp_model.get_norm_sample().double().cpu(), oracle.norms, rtol=rtol, atol=atol)
    scale = x.shape[0] if reduction == "mean" else 1
    for name, p in model.named_parameters():
        expected = oracle.clipped_sum[name] / scale
        torch.testing.assert_close(p.grad.double().cpu(), expected, rtol=rtol, atol=atol * max(1.0, float(expected.abs().max())))
        if expected.abs().max() > 1e-6:  # (some have none: an attention key's bias cannot change the softmax)
            assert not torch.equal(p.detach(), before[name]), f"{name} was not updated by the optimizer"
    dp_opt.zero_grad()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,reduction", [("fp64", "sum"), ("fp32", "mean")])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["ghost", "flash", "flash_fuse"])
def test_graphed_steps_match_float64_microbatch(mode, kind, reduction, batch, dtype):
    """Three steps of one shape (capture, then two replays with new data and the updated parameters) and a
    step of a new length (a second graph): each against the oracle run on the parameters of that step."""
    device = torch.device("cuda")
    torch_dtype = torch.float64 if dtype == "fp64" else torch.float32
    model, x, y = build(kind, 37, batch=batch)
    model = model.to(device, torch_dtype)
    dp_model, dp_opt, criterion, _ = _private(model, x, y, mode, reduction)
    step = CudaGraphStep(dp_model, lambda xb, yb: criterion(dp_model(xb), yb))
    tol = TOLERANCES["fp64"] if dtype == "fp64" else TOLERANCES["tf32"]
    for xb, yb in _batches(kind, 37, batch, 3, torch_dtype, device):
        _check_step_against_oracle(model, dp_model, dp_opt, step, xb, yb, reduction, 1e-2, tol)
    assert step.num_graphs == 1
    if kind != "linear2d":
        for xb, yb in _batches(kind, 600, batch, 1, torch_dtype, device):
            _check_step_against_oracle(model, dp_model, dp_opt, step, xb, yb, reduction, 1e-2, tol)
        assert step.num_graphs == 2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["ghost", "flash", "flash_fuse"])
def test_graphed_bf16_autocast_steps_match_float64(mode):
    """bf16 autocast entered inside loss_fn (the supported way), T = 1030: within bf16's 1e-2 (relative) of the
    oracle, at the capture and at a replay with new data and updated parameters."""
    device = torch.device("cuda")
    model = TinyLM().to(device)
    ids = [torch.randint(0, VOCAB, (3, 1030)) for _ in range(2)]
    labels = [torch.randint(0, VOCAB, (3,)) for _ in range(2)]
    dp_model, dp_opt, criterion, _ = _private(model, ids[0], labels[0], mode, reduction="sum")

    def loss_fn(xb, yb):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return criterion(dp_model(xb), yb)

    step = CudaGraphStep(dp_model, loss_fn)
    rtol, _ = TOLERANCES["bf16"]
    for xb, yb in zip(ids, labels):
        oracle = microbatch_reference(_hook_free_copy(model), xb, yb, _sample_loss, 1e-2)
        step(xb.to(device), yb.to(device))
        assert _rel(dp_model.get_norm_sample().double().cpu(), oracle.norms) < rtol
        for name, p in model.named_parameters():
            assert _rel(p.grad.double().cpu(), oracle.clipped_sum[name]) < rtol, name
        dp_opt.step()
        dp_opt.zero_grad()


@pytest.mark.gpu
def test_graphed_step_rejects_a_non_finite_loss_and_changes_nothing():
    device = torch.device("cuda")
    model, x, y, dp_model, dp_opt, step = _graphed("layernorm", "flash_fuse", device)
    step(x.to(device), y.to(device))  # captured with a finite loss
    dp_opt.step()
    dp_opt.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = x.clone()
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        step(bad.to(device), y.to(device))
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])
    step(x.to(device), y.to(device))  # the graph still serves good batches
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
def test_freed_graphed_steps_leave_the_device_usable():
    """Freeing graphed steps leaves the device usable: no pinned copy is recorded inside a graph, so the host
    allocator never queries an event recorded during capture (a later, unrelated op would fail with "invalid
    argument")."""
    import gc

    device = torch.device("cuda")
    for _ in range(3):
        model, x, y, dp_model, dp_opt, step = _graphed("layernorm", "flash_fuse", device)
        for _ in range(2):
            step(x.to(device), y.to(device))
            dp_opt.step()
            dp_opt.zero_grad()
        del model, dp_model, dp_opt, step
        gc.collect()
        torch.empty(1 << 20, pin_memory=True)  # the host allocator processes the events of freed blocks here
        torch.cuda.synchronize()
        assert torch.ones(3, device=device).sum().item() == 3.0


@pytest.mark.gpu
def test_a_module_freed_during_a_capture_leaves_the_device_usable():
    """A module freed while a stream its loss-check flag was copied on captures a graph leaves the device usable:
    the pinned flags live as long as the process, so no freed block leaves the host allocator an event recorded
    during capture (the next pinned allocation, e.g. ``.item()``, would fail with "invalid argument")."""
    import gc

    device = torch.device("cuda")
    stream = torch.cuda.Stream(device=device)
    model, x, y = build("layernorm", 37)
    dp_model, dp_opt, criterion, _ = _private(model.to(device), x, y, "flash_fuse")
    with torch.cuda.stream(stream):  # an eager step: its loss check copies the flag on `stream`
        criterion(dp_model(x.to(device)), y.to(device)).backward()
    stream.synchronize()
    doomed = [model, dp_model, dp_opt, criterion]  # kept alive past the collection torch.cuda.graph runs first
    del model, dp_model, dp_opt, criterion
    static = torch.zeros(4, device=device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static.add_(1)
        doomed.clear()
        gc.collect()  # the module (reference cycles through its hooks) is freed here, during the capture
    graph.replay()
    assert static.sum().item() == 4.0
    assert torch.ones(3, device=device).sum().item() == 3.0


@pytest.mark.gpu
def test_graphed_plain_loss_matches_float64_autograd():
    """Non-private training through the same class: the batch gradient, against float64 autograd."""
    device = torch.device("cuda")
    model, x, y = build("layernorm", 37)
    model = model.to(device)
    step = CudaGraphStep(model, lambda xb, yb: nn.functional.cross_entropy(model(xb), yb))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for xb, yb in _batches("layernorm", 37, 4, 3, torch.float32, device):
        ref = _hook_free_copy(model).double()
        nn.functional.cross_entropy(ref(xb.double().cpu()), yb.cpu()).backward()
        step(xb, yb)
        for (name, p), r in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.double().cpu(), r.grad, rtol=1e-3, atol=1e-5)
        optimizer.step()
        with pytest.raises(RuntimeError, match="cannot accumulate"):
            step(xb, yb)
        optimizer.zero_grad()


@pytest.mark.gpu
def test_graphed_step_runs_an_empty_batch_eagerly():
    device = torch.device("cuda")
    model, x, y, dp_model, dp_opt, step = _graphed("linear3d", "flash_fuse", device)
    step(x[:0].to(device), y[:0].to(device))
    assert step.num_graphs == 0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.gpu
def test_graphed_step_refuses_an_outer_autocast_with_its_cache():
    device = torch.device("cuda")
    _, x, y, _, _, step = _graphed("linear3d", "flash_fuse", device)
    with torch.autocast("cuda", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="inside loss_fn"):
        step(x.to(device), y.to(device))


# -- CPU: the eager path and the refusals ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ghost", "flash_fuse"])
def test_cpu_batches_run_eagerly_and_match_float64_microbatch(mode):
    model, x, y = build("layernorm", 37)
    model = model.double()
    dp_model, dp_opt, criterion, _ = _private(model, x, y, mode, reduction="sum")
    step = CudaGraphStep(dp_model, lambda xb, yb: criterion(dp_model(xb), yb))
    for xb, yb in _batches("layernorm", 37, 4, 2, torch.float64, torch.device("cpu")):
        _check_step_against_oracle(model, dp_model, dp_opt, step, xb, yb, "sum", 1e-2, TOLERANCES["fp64"])
    assert step.num_graphs == 0


def test_refusals_name_the_problem():
    model, x, y = build("linear3d", 37)
    with pytest.raises(ValueError, match="warmup_steps"):
        CudaGraphStep(model, lambda xb: model(xb).sum(), warmup_steps=0)
    step = CudaGraphStep(model, lambda xb: {"loss": model(xb).sum()})
    with pytest.raises(TypeError, match="DP loss"):
        step(x)
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients enabled"):
        step(x)
    with pytest.raises(TypeError, match="positional"):
        step(x, "labels")

    from opacus import GradSampleModule

    gsm = GradSampleModule(model)
    with pytest.raises(NotImplementedError, match="flash_fuse"):
        CudaGraphStep(gsm, lambda xb: gsm(xb).sum())(x)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["ghost", "flash_fuse"])
def test_a_new_clipping_bound_is_captured_anew(mode):
    """A clipping scheduler lowers C between steps: the next replay clips to the new C (a new capture), as the
    noise is sized for it, and matches the oracle at that C."""
    device = torch.device("cuda")
    model, x, y = build("linear3d", 37, batch=3)
    model = model.to(device, torch.float64)
    dp_model, dp_opt, criterion, _ = _private(model, x, y, mode, "sum")
    step = CudaGraphStep(dp_model, lambda xb, yb: criterion(dp_model(xb), yb))
    (xb, yb), = _batches("linear3d", 37, 3, 1, torch.float64, device)
    _check_step_against_oracle(model, dp_model, dp_opt, step, xb, yb, "sum", 1e-2, TOLERANCES["fp64"])
    dp_opt.max_grad_norm = 1e-3
    _check_step_against_oracle(model, dp_model, dp_opt, step, xb, yb, "sum", 1e-3, TOLERANCES["fp64"])
