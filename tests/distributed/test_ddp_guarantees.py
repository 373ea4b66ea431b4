"""The single-process guarantee rows under DDP, on 2 gloo ranks, as an attacker would (noise 0, lr 1, C = 1,
``sum``: the applied update is Σ_b c_b ∇ℓ_b over both ranks' samples):

* a gradient hook on a parameter (``register_hook``, ``register_post_accumulate_grad_hook``, ×1000) is refused by
  every rank's DP backward, naming the parameter, with every parameter unchanged;
* a loss whose rows are not in the model's batch order (``criterion(out.flip(0), g.flip(0))``) is clipped per
  model row: the adversarial sample's influence is ≤ C(1 + 10⁻³) and the step equals the float64 oracle on the
  union batch;
* C or σ changed between the clipped backward and ``optimizer.step()`` (on every rank) is refused at the step with
  every parameter unchanged;
* a rank holding the adversarial sample alone, after a step of one sample (its step takes the one-sample path: one
  ordinary backward, the gradient clipped whole): its influence is ≤ C(1 + 10⁻³), the step the float64 oracle's on
  the union batch, and a gradient hook is refused there too.

The probe scenario of `tests.grad_sample.guarantee` (Linear → tanh → Linear under ⟨out_b, G_b⟩, the last
sample 10× the input and 1000× the output gradient) is split over the ranks: rank 0 holds samples 0-1, rank 1 the
rest, the adversarial one among them.
"""

from __future__ import annotations

import functools
import traceback

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import CLIPPING_MODES, TOLERANCES
from tests.distributed.workers import launch_group, run_in_group
from tests.grad_sample.guarantee import C, LinearLoss, adversarial, probe, reference, sample_loss

HOOKS = ("register_hook", "register_post_accumulate_grad_hook")
#: (attribute set on the optimizer after the backward, the value the backward was clipped with, the new value)
CHANGES = {"max_grad_norm": (10 * C, C), "noise_multiplier": (0.0, 1.0)}


def _batches():
    """{"with": (x, g), "without": (x, g)}: the adversarial batch and the batch less its adversarial sample."""
    with_it, without = adversarial()
    return {"with": with_it, "without": without}


def _job(mode: str, batch: str, rank: int, hook=None, change=None, flip=False, one_sample=False) -> dict:
    """One DP step of the DDP-wrapped probe on this rank's share of ``batch``; returns what it applied (flat,
    float64), or the error and whether every parameter stayed as it was. ``one_sample``: rank 1 holds the last
    sample alone (none for the batch without it), and a clipped backward on the same shares (no optimizer step)
    comes first, so that its step is trusted to be of one sample."""
    from flashnorm import FlashNormPrivacyEngine

    x, g = _batches()[batch]
    model = probe()
    ddp = DDP(model)
    clip, sigma = C, 0.0
    if change is not None:
        clip, sigma = (CHANGES[change][0], sigma) if change == "max_grad_norm" else (clip, CHANGES[change][0])
    dp_model, optimizer, criterion, _ = FlashNormPrivacyEngine().make_private(
        module=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(8)), batch_size=4), criterion=LinearLoss("sum"),
        noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode,
        loss_reduction="sum",
    )
    first = 3 if one_sample else 2  # rank 0's samples
    local = slice(0, first) if rank == 0 else slice(first, None)
    if one_sample:
        criterion(dp_model(x[local]), g[local]).backward()
        optimizer.zero_grad(set_to_none=True)
    if hook == "register_hook":
        model[2].weight.register_hook(lambda grad: 1000 * grad)
    elif hook == "register_post_accumulate_grad_hook":
        model[2].weight.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(1000))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = {}
    try:
        out = dp_model(x[local])
        result["parked"] = dp_model.hooks.parked
        target = g[local]
        loss = criterion(out.flip(0), target.flip(0)) if flip else criterion(out, target)
        loss.backward()
        if change is not None:
            setattr(optimizer, change, CHANGES[change][1])
        optimizer.step()
    except (RuntimeError, ValueError, NotImplementedError) as err:
        result["error"] = f"{type(err).__name__}: {err}"
    result["unchanged"] = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    result["applied"] = torch.cat([(before[n] - p.detach()).double().flatten() for n, p in model.named_parameters()])
    return result


JOBS = {
    **{f"{mode}-{hook}": functools.partial(_job, mode, "with", hook=hook) for mode in CLIPPING_MODES for hook in HOOKS},
    **{f"{mode}-flip-{batch}": functools.partial(_job, mode, batch, flip=True)
       for mode in CLIPPING_MODES for batch in ("with", "without")},
    **{f"{mode}-{change}-changed": functools.partial(_job, mode, "with", change=change)
       for mode in CLIPPING_MODES for change in CHANGES},
    **{f"{mode}-one-sample-{batch}": functools.partial(_job, mode, batch, one_sample=True)
       for mode in CLIPPING_MODES for batch in ("with", "without")},
    **{f"{mode}-one-sample-{hook}": functools.partial(_job, mode, "with", hook=hook, one_sample=True)
       for mode in CLIPPING_MODES for hook in HOOKS},
}


def _failed(err: Exception) -> dict:
    return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}


def _ranks(rank: int, world: int, init_file: str, out_dir: str) -> None:
    run_in_group(rank, world, "gloo", init_file, out_dir,
                 {name: functools.partial(job, rank=rank) for name, job in JOBS.items()}, failed=_failed)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch_group(_ranks, 2, str(tmp_path_factory.mktemp("ddp_guarantees")))


def _refused_everywhere(results, name: str, pattern: str) -> None:
    for rank, res in enumerate(results):
        got = res[name]
        assert pattern in got.get("error", ""), (rank, got.get("error"), got.get("trace"))
        assert got["unchanged"], f"rank {rank} changed parameters"


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_a_gradient_hook_on_a_parameter_is_refused_under_ddp(results, mode, hook):
    _refused_everywhere(results, f"{mode}-{hook}", "Parameter 'module.2.weight' has a gradient hook")


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_a_loss_not_in_batch_order_is_clipped_per_sample_under_ddp(results, mode):
    """Both ranks apply the same update; the adversarial sample moves it by ≤ C(1 + 10⁻³); with and without it, the
    update is the float64 oracle's Σ_b c_b ∇ℓ_b on the union batch."""
    _assert_influence_bounded(results, f"{mode}-flip")


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_the_adversarial_sample_alone_on_a_rank_takes_the_one_sample_path_clipped(results, mode):
    """Rank 1 holds the adversarial sample alone after a step of one sample: its step is the one-sample path (hooks
    parked), the sample's influence ≤ C(1 + 10⁻³), each update the float64 oracle's on the union batch."""
    assert [res[f"{mode}-one-sample-with"]["parked"] for res in results] == [False, True]
    _assert_influence_bounded(results, f"{mode}-one-sample")


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_a_gradient_hook_is_refused_on_the_one_sample_path_under_ddp(results, mode, hook):
    _refused_everywhere(results, f"{mode}-one-sample-{hook}", "Parameter 'module.2.weight' has a gradient hook")


def _assert_influence_bounded(results, prefix: str) -> None:
    """The jobs ``prefix``-with and -without: every rank applied the same update, the float64 oracle's on the
    union batch, and the two differ by ≤ C(1 + 10⁻³)."""
    applied = {}
    for batch in ("with", "without"):
        got = [res[f"{prefix}-{batch}"] for res in results]
        for rank, res in enumerate(got):
            assert "error" not in res, (rank, res.get("trace"))
        torch.testing.assert_close(got[0]["applied"], got[1]["applied"], rtol=0, atol=0)
        x, g = _batches()[batch]
        clipped = reference(probe(), x, g, C, loss=sample_loss).clipped_sum
        expected = torch.cat([clipped[n].flatten() for n, _ in probe().named_parameters()])
        rtol, atol = TOLERANCES["fp64"]
        torch.testing.assert_close(got[0]["applied"], expected, rtol=rtol, atol=atol)
        applied[batch] = got[0]["applied"]
    influence = float((applied["with"] - applied["without"]).norm())
    assert influence <= C * (1 + 1e-3), f"influence {influence:.4g} > C = {C}"


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_c_or_sigma_changed_between_backward_and_step_is_refused_under_ddp(results, mode, change):
    _refused_everywhere(results, f"{mode}-{change}-changed", f"optimizer.step() refused: {change} from")
