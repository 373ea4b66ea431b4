"""DDP and FSDP2 on 2 ranks against the float64 single-process microbatch oracle on the union batch.

All cases run in one spawn of 2 processes (gloo on CPU by default; ``FLASHNORM_DIST_BACKEND=nccl`` runs
them with NCCL on 2 GPUs, see ``tests/distributed/run_gpu.sh``); each test checks the saved results of
one case. A step on W ranks with local batches ℬ_r must equal the single-process step on ∪_r ℬ_r:

    p.grad = (Σ_b c_b ∇ℓ_b + ξ) / B_global  (mean)   or   Σ_b c_b ∇ℓ_b + ξ  (sum),   ξ ~ N(0, σ²C²),

with every sample's norm computed on its own rank and ξ added once across the world.
"""

from __future__ import annotations

import os

import pytest
import torch

from flashnorm.grad_sample.provenance import mark_clipped
from flashnorm.optimizers import DPOptimizerFastGradientClipping
from tests.conftest import TOLERANCES
from tests.distributed.workers import Case, Launch, build, sample_loss
from tests.oracle import microbatch_reference

BACKEND = os.environ.get("FLASHNORM_DIST_BACKEND", "gloo")
DEVICE = torch.device("cuda" if BACKEND == "nccl" else "cpu")
# fp32 on CPU; on the GPU the norm kernels may use tf32 (the tolerance table of tests/conftest.py).
RTOL, ATOL = TOLERANCES["tf32" if BACKEND == "nccl" else "fp32"]

MODES = {"ddp": ("ghost", "flash", "flash_fuse"), "fsdp": ("ghost_fsdp", "flash_fsdp", "flash_fuse_fsdp")}
ORACLE_CASES = [
    *(Case(f"{m}-clip-mean-uneven", w, m) for w, modes in MODES.items() for m in modes),
    *(Case(f"{m}-noclip-sum", w, m, sizes=(4, 4), reduction="sum", clip=1e10)
      for w, modes in MODES.items() for m in modes),
    *(Case(f"{m}-frozen", w, m, frozen=True)
      for w, m in [("ddp", "flash_fuse"), ("fsdp", "flash_fsdp"), ("fsdp", "flash_fuse_fsdp")]),
    *(Case(f"{m}-empty-rank", w, m, sizes=(4, 0))
      for w, m in [("ddp", "flash_fuse"), ("fsdp", "ghost_fsdp"), ("fsdp", "flash_fuse_fsdp")]),
    *(Case(f"{m}-tied", "ddp", m, tied=True) for m in MODES["ddp"]),  # the cross term on each rank
    Case("flash_fuse_fsdp-forced-flash", "fsdp", "flash_fuse_fsdp", norm_method="flash"),
    Case("flash_fuse_fsdp-forced-gram", "fsdp", "flash_fuse_fsdp", norm_method="gram"),
    Case("flash_fuse_fsdp-shard-dim1", "fsdp", "flash_fuse_fsdp", shard_dim1=True),
    Case("flash_fuse-dpddp-one-sample", "dpddp", "flash_fuse", sizes=(1, 4)),  # one-pass B = 1 shortcut on rank 0
    Case("flash_fuse_fsdp-one-sample", "fsdp", "flash_fuse_fsdp", sizes=(1, 3)),
    Case("flash_fuse-one-sample", "ddp", "flash_fuse", sizes=(1, 3)),
    # a second step of one sample per rank: the one-sample path under DDP (an ordinary backward under no_sync, the
    # local gradient clipped whole), not under FSDP2 (a rank holds shards of the gradient)
    *(Case(f"{m}-one-sample-warm", w, m, sizes=(1, 3), warm=True)
      for w, m in [("ddp", "flash_fuse"), ("ddp", "flash"), ("ddp", "ghost"), ("fsdp", "flash_fuse_fsdp")]),
    Case("flash_fuse-one-sample-warm-tied", "ddp", "flash_fuse", sizes=(1, 1), warm=True, tied=True),
    Case("flash-dpddp", "dpddp", "flash", reduction="sum"),
    Case("flash_fuse-poisson", "ddp", "flash_fuse", sizes=(4, 4), poisson=True),
    Case("flash_fuse_fsdp-poisson", "fsdp", "flash_fuse_fsdp", sizes=(4, 4), poisson=True),
]
NOISY = dict(sizes=(3, 5), sigma=0.7, clip=0.3, wide=True, seed=1)
NOISE_CASES = [
    *(Case(f"{m}-noise", w, m, **NOISY)
      for w, m in [("ddp", "flash_fuse"), ("ddp", "flash"), ("fsdp", "flash_fuse_fsdp"), ("fsdp", "ghost_fsdp")]),
    Case("flash_fuse_fsdp-noise-shard-dim1", "fsdp", "flash_fuse_fsdp", shard_dim1=True, **NOISY),
    Case("flash_fuse-noise-secure", "ddp", "flash_fuse", secure=True, **NOISY),
    Case("flash_fuse_fsdp-noise-secure", "fsdp", "flash_fuse_fsdp", secure=True, **NOISY),
]
ERROR_CASES = [  # (case, what every rank's error must say)
    (Case("fsdp-leaf-unit", "fsdp-leaf", "flash_fuse_fsdp"), "is an FSDP2 unit itself"),
    (Case("fsdp-with-ddp-mode", "fsdp", "flash_fuse"), "use grad_sample_mode='flash_fuse_fsdp'"),
    (Case("ddp-with-fsdp-mode", "ddp", "flash_fsdp"), "need a module wrapped with FSDP2"),
    (Case("ranks-disagree-on-batch", "fsdp", "flash_fsdp", rank_batch=True),
     "expected_batch_size differs across ranks"),
    *((Case(f"{m}-outside-use-step-two", w, m, leak=True), "outside that layer")
      for w, modes in MODES.items() for m in modes),
]
BF16_CASES = [Case(f"{m}-bf16", "fsdp", m, sizes=(3, 4), bf16=True) for m in MODES["fsdp"]]

EXPECTED_CLASSES = {
    "ddp": ("DDPGradSampleModuleFastGradientClipping", "DistributedDPOptimizerFastGradientClipping"),
    "dpddp": ("GradSampleModuleFastGradientClipping", "DistributedDPOptimizerFastGradientClipping"),
    "fsdp": ("FSDPGradSampleModuleFastGradientClipping", "FSDPOptimizerFastGradientClipping"),
}


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    if BACKEND == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("FLASHNORM_DIST_BACKEND=nccl needs 2 CUDA GPUs")
    cases = ORACLE_CASES + NOISE_CASES + BF16_CASES + [case for case, _ in ERROR_CASES]
    return Launch(BACKEND).run(cases, str(tmp_path_factory.mktemp("dist")))


def _results(launch, case):
    per_rank = [r[case.name] for r in launch.results]
    for rank, res in enumerate(per_rank):
        if "error" in res:
            pytest.fail(f"rank {rank} raised in case {case.name}:\n{res['error']}")
    return per_rank


def _oracle(case, per_rank):
    """The float64 microbatch step on the union of the ranks' batches (in rank order)."""
    model, ids, targets = build(case)
    union = torch.cat([res["index"] for res in per_rank]) % case.batch  # the loader's dataset holds ids twice
    return microbatch_reference(model, ids[union], targets[union], sample_loss, case.clip)


def _expected_grads(case, oracle):
    scale = 1.0 / case.batch if case.reduction == "mean" else 1.0
    return {name: g * scale for name, g in oracle.clipped_sum.items()}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: c.name)
def test_step_equals_single_process_step_on_union_batch(launch, case):
    per_rank = _results(launch, case)
    oracle = _oracle(case, per_rank)
    expected = _expected_grads(case, oracle)
    gsm, optimizer = EXPECTED_CLASSES[case.wrapper]
    assert per_rank[0]["class"].startswith(gsm) and per_rank[0]["optimizer"] == optimizer
    assert per_rank[0]["ddp_reductions"] == 0  # DDP's forward ran under no_sync: one reduction, the optimizer's
    # each sample's norm on its own rank, never combined with another rank's
    norms = torch.cat([res["norms"] for res in per_rank])
    torch.testing.assert_close(norms, oracle.norms, rtol=RTOL, atol=ATOL)
    if case.clip < 1e9:
        assert (oracle.norms > case.clip).all(), "clipping must be active in this case"
    for rank, res in enumerate(per_rank):
        assert set(res["grads"]) == set(expected), rank
        for name, grad in res["grads"].items():
            torch.testing.assert_close(grad, expected[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
        for name, p in res["params"].items():
            step = expected.get(name, torch.zeros_like(p))  # SGD, lr = 1; frozen parameters never move
            torch.testing.assert_close(p, res["before"][name] - step, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{name}: {m}")
    if case.warm:  # B = 1 after B = 1 on rank 0 (and on rank 1 when it holds one): parked, except under FSDP2
        assert [res["parked"] for res in per_rank] == [s == 1 and case.wrapper != "fsdp" for s in case.sizes]
    if case.frozen:
        assert "blocks.0.fc1.weight" not in expected
        assert torch.equal(per_rank[0]["params"]["blocks.0.fc1.weight"], per_rank[0]["before"]["blocks.0.fc1.weight"])


def _single_device_noise(case, reference_grads):
    """ξ / B_global from FlashNorm's single-device optimizer with the ranks' noise seed."""
    model, _, _ = build(case)
    model.to(DEVICE)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    mark_clipped(model.parameters(), 1)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=case.sigma, max_grad_norm=case.clip,
        expected_batch_size=case.batch, generator=torch.Generator(device=DEVICE).manual_seed(1234),
        secure_mode=case.secure,
    )
    optimizer.step()
    grads = [p.grad.double().cpu().flatten() for name, p in model.named_parameters() if name in reference_grads]
    return torch.cat(grads)


@pytest.mark.parametrize("case", NOISE_CASES, ids=lambda c: c.name)
def test_noise_is_added_once_with_std_sigma_c_over_global_batch(launch, case):
    per_rank = _results(launch, case)
    expected = _expected_grads(case, _oracle(case, per_rank))
    signal = torch.cat([g.flatten() for g in expected.values()])
    applied = torch.cat([per_rank[0]["grads"][name].flatten() for name in expected])
    noise = applied - signal
    assert noise.numel() >= 50_000
    std = case.sigma * case.clip / case.batch  # once across the world: not √W (or W) times larger
    assert abs(noise.std().item() / std - 1) < 0.05
    assert abs(noise.mean().item()) < 0.05 * std
    # Rank 0's draws (DDP) or every owner's slice of the same full draws (FSDP): the step is the oracle's
    # plus exactly the noise of a single-device step seeded alike (up to the rounding of ξ, 1e-6·std).
    torch.testing.assert_close(applied - _single_device_noise(case, expected), signal, rtol=RTOL,
                               atol=ATOL + 1e-6 * std)
    for res in per_rank[1:]:  # replicas agree
        for name, grad in res["grads"].items():
            assert torch.equal(grad, per_rank[0]["grads"][name]), name


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16_mixed_precision_within_bf16_tolerance(launch, case):
    per_rank = _results(launch, case)
    oracle = _oracle(case, per_rank)
    rtol, _ = TOLERANCES["bf16"]
    norms = torch.cat([res["norms"] for res in per_rank])
    assert _rel(norms, oracle.norms) < rtol, (norms, oracle.norms)
    for name, grad in _expected_grads(case, oracle).items():
        assert _rel(per_rank[0]["grads"][name], grad) < rtol, name


@pytest.mark.parametrize("case,message", ERROR_CASES, ids=[c.name for c, _ in ERROR_CASES])
def test_unsupported_layouts_fail_clearly_on_every_rank(launch, case, message):
    for rank, res in enumerate(launch.results):
        assert message in res[case.name].get("error", ""), (rank, res[case.name])
