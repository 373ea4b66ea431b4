"""Lightning's Trainer with DPDDPStrategy on 2 processes (gloo on CPU, ``accelerator="cpu", devices=2``; with
``FLASHNORM_DIST_BACKEND=nccl``, NCCL on 2 GPUs): one DP step over both ranks' shares of one Poisson draw equals the
float64 per-sample reference; the replicas stay identical; the accountant is the single-process one; a resumed run
goes on as the uninterrupted one; misuse is refused before any step."""


import pytest
import torch

pytest.importorskip("lightning")

from opacus.accountants import RDPAccountant  # noqa: E402

from tests.conftest import TOLERANCES  # noqa: E402
from tests.integrations.lightning_ddp_workers import (  # noqa: E402
    BACKEND,
    CLIP,
    EXACT_BATCH,
    LR,
    N,
    NOISY_BATCH,
    SIGMA,
    WORLD,
    dataset,
    net,
    sample_loss,
)
from tests.integrations.ranks import case_results, spawn_ranks  # noqa: E402
from tests.oracle import microbatch_reference  # noqa: E402

# fp32 on CPU; on the GPU the flash kernels' dots may use tf32 (the tolerance table of tests/conftest.py)
RTOL, ATOL = TOLERANCES["tf32" if BACKEND == "nccl" else "fp32"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if BACKEND == "nccl" and torch.cuda.device_count() < WORLD:
        pytest.skip("FLASHNORM_DIST_BACKEND=nccl needs 2 CUDA GPUs")

    from tests.integrations.lightning_ddp_workers import run

    return spawn_ranks(run, WORLD, tmp_path_factory.mktemp("lightning_ddp"))


def _assert_ddp_path(per_rank):
    for rank, res in enumerate(per_rank):
        assert (res["world_size"], res["global_rank"]) == (WORLD, rank)
        assert res["device"] == (f"cuda:{rank}" if BACKEND == "nccl" else "cpu")
        assert res["classes"] == ("DDPGradSampleModuleFastGradientClippingFuse", "DistributedDataParallel",
                                  "DistributedDPOptimizerFastGradientClipping")
        assert res["loader_sampler"] == "RankShareSampler"  # the library's shared Poisson sampling, not Lightning's


def _assert_replicas_identical(per_rank):
    for name, p in per_rank[0]["params"].items():
        assert torch.equal(p, per_rank[1]["params"][name]), name


def _shares(per_rank, step):
    """Each rank's sample indices at ``step``: disjoint; together one draw."""
    shares = [set(res["shares"][step].tolist()) for res in per_rank]
    assert not shares[0] & shares[1], step
    return shares


def test_a_step_is_the_clipped_sum_over_both_ranks_shares_divided_by_the_expected_batch(ranks):
    per_rank = case_results(ranks, "exact")
    _assert_ddp_path(per_rank)
    assert all(len(res["shares"]) == 1 for res in per_rank)
    drawn = sorted(set.union(*_shares(per_rank, 0)))
    assert all(len(res["shares"][0]) > 0 for res in per_rank)  # both ranks held samples (the seeded draw)
    x, y, _ = dataset().tensors
    model = net()
    oracle = microbatch_reference(model, x[drawn], y[drawn], sample_loss, CLIP)
    assert (oracle.norms > CLIP).any() and (oracle.norms < CLIP).any()  # some clipped, some not
    for res in per_rank:
        for name, applied in res["applied"][0].items():
            expected = oracle.clipped_sum[name] / EXACT_BATCH  # the expected global batch size, N · q
            torch.testing.assert_close(applied.double(), expected, rtol=RTOL, atol=ATOL, msg=name)
            torch.testing.assert_close(res["params"][name], res["before"][name] - LR * applied, msg=name)  # SGD
        assert res["history"] == [(0.0, EXACT_BATCH / N, 1)]
    _assert_replicas_identical(per_rank)


def _single_process_epsilon(steps):
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=SIGMA, sample_rate=NOISY_BATCH / N)
    return accountant.get_epsilon(1e-5)


def test_noisy_steps_keep_the_replicas_identical_and_account_as_one_process(ranks):
    per_rank = case_results(ranks, "noisy")
    _assert_ddp_path(per_rank)
    steps = 2 * N // NOISY_BATCH
    for res in per_rank:
        assert len(res["shares"]) == steps  # every rank takes every draw, an empty share included
        assert res["history"] == [(SIGMA, NOISY_BATCH / N, steps)]  # once per step, at the single-process q
        assert res["epsilon"] == _single_process_epsilon(steps)
    for step in range(steps):
        _shares(per_rank, step)
    _assert_replicas_identical(per_rank)  # the noise added once (rank 0) and all-reduced
    assert not torch.equal(per_rank[0]["params"]["0.weight"], per_rank[0]["before"]["0.weight"])


def test_resuming_goes_on_as_the_uninterrupted_run(ranks):
    per_rank = case_results(ranks, "resumed")
    whole = case_results(ranks, "noisy")
    _assert_ddp_path(per_rank)
    for res, uninterrupted in zip(per_rank, whole):
        assert res["first_epoch_history"] == [(SIGMA, NOISY_BATCH / N, 4)]
        assert res["history"] == uninterrupted["history"] and res["epsilon"] == uninterrupted["epsilon"]
        # the second epoch's shares and steps: the Poisson draws and the noise go on from the checkpoint
        assert [s.tolist() for s in res["shares"]] == [s.tolist() for s in uninterrupted["shares"][4:]]
        for name, p in res["params"].items():
            torch.testing.assert_close(p, uninterrupted["params"][name], rtol=RTOL, atol=ATOL, msg=name)
    _assert_replicas_identical(per_rank)


@pytest.mark.parametrize("case, message", [
    ("not_distributed", "distribute"),  # make_private(module=self.net): a one-process DP optimizer
    ("whole_dataset", "whole dataset"),  # a training loader that is not the ranks' shares
])
def test_misuse_is_refused_before_any_step(ranks, case, message):
    for res in case_results(ranks, case):
        assert res["error_message"] is not None and message in res["error_message"]
        assert res["unchanged"] and res["history"] == []
