"""DPTrainer on 2 processes (DDP, gloo on CPU, the environment torchrun gives): one DP step over the logical
batch of both ranks equals the float64 per-sample reference, also with the model on the fused head's wrapper ("auto":
its unfused path at these lengths; "on": the fused head); Poisson sampling and accounting of the logical batch."""


import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.integrations.ranks import case_results, spawn_ranks
from tests.integrations.test_transformers import (
    assert_matches,
    lm_rows,
    opacus_epsilon,
    reference_grad,
    tiny_gpt2,
)

WORLD = 2


@pytest.fixture(scope="module")
def clip():
    _, norms = reference_grad(tiny_gpt2(), lm_rows(4), 1.0)
    return float(norms.median())  # some samples clipped, some not


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, clip):
    from tests.integrations.ddp_workers import run

    out = tmp_path_factory.mktemp("hf_ddp")
    return out, spawn_ranks(run, WORLD, out, clip)


def _row_keys(ids: torch.Tensor):
    return [tuple(row.tolist()) for row in ids]


def _assert_ddp_path(res):
    assert res["world_size"] == WORLD
    assert (res["gsm"], res["ddp"], res["optimizer"]) == (
        "DDPGradSampleModuleFastGradientClippingFuse", "DistributedDataParallel",
        "DistributedDPOptimizerFastGradientClipping",
    )
    assert res["ddp_reductions"] == 0  # one reduction per step, the DP optimizer's: none by DDP or accelerate


@pytest.mark.parametrize("case", ["exact", "fused_auto", "fused_on"])
def test_first_step_is_the_clipped_mean_over_both_ranks_logical_batch(ranks, clip, case):
    """fused_auto (where "auto" wraps the model: CUDA, pretended; these short micro-batches take its unfused path) and
    fused_on (the fused head): each rank on the wrapper, the same step."""
    out, ranks = ranks
    per_rank = case_results(ranks, case)
    rows = lm_rows(4)
    model = tiny_gpt2()
    reference, norms = reference_grad(model, rows, clip)
    assert (norms > clip).any() and (norms < clip).any()
    # each rank ran its share in 2 micro-batches; together they are the logical batch, each sample once
    assert all(len(res["micro_batches"]) == 2 for res in per_rank)
    seen = [key for res in per_rank for ids in res["micro_batches"] for key in _row_keys(ids)]
    assert sorted(seen) == sorted(_row_keys(rows.columns["input_ids"]))
    for rank, res in enumerate(per_rank):
        _assert_ddp_path(res)
        fused = case != "exact"
        assert res["ddp_module"] == ("FusedHeadCausalLM" if fused else "GPT2LMHeadModel") and res["fused"] == fused
        assert res["logical_batch_size"] == 4
        assert res["history"] == [(0.0, 1.0, 1)]
        model.load_state_dict(res["params"], strict=False)
        before = tiny_gpt2()
        before.load_state_dict(res["before"], strict=False)
        assert_matches(model, res["grads"], before, reference)
    for name, p in per_rank[0]["params"].items():  # the replicas stay identical
        assert torch.equal(p, per_rank[1]["params"][name]), name
    saved = transformers.GPT2LMHeadModel.from_pretrained(str(out / case / "saved"))  # the plain model
    for name, p in saved.named_parameters():
        assert torch.equal(p, per_rank[0]["params"][name]), name


def test_poisson_logical_batch_is_shared_by_the_ranks_and_accounted_once(ranks):
    _, ranks = ranks
    per_rank = case_results(ranks, "poisson")
    for res in per_rank:
        _assert_ddp_path(res)
        assert len(res["micro_batches"]) == 6 * 2  # 6 DP steps of 2 micro-batches on every rank
        assert res["history"] == [(0.8, 0.25, 6)]  # q = L / N = 4 / 16, one accountant step per logical batch
        assert res["epsilon"] == opacus_epsilon("rdp", 0.8, 0.25, 6, 1e-5)
    assert any(len(ids) == 0 for res in per_rank for ids in res["micro_batches"])  # a rank's empty micro-batch
    # Poisson-sampled as a whole (Opacus's sampler, the data seed, two epochs): the ranks' disjoint shares make
    # up each draw
    keys = _row_keys(lm_rows(16).columns["input_ids"])
    generator = torch.Generator().manual_seed(0)
    sampler = UniformWithReplacementSampler(num_samples=16, sample_rate=0.25, generator=generator)
    draws = [drawn for _ in range(2) for drawn in sampler]
    for step, drawn in enumerate(draws[:6]):
        shares = [[key for ids in res["micro_batches"][2 * step: 2 * step + 2] for key in _row_keys(ids)]
                  for res in per_rank]
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == sorted(keys[i] for i in drawn)
    for name, p in per_rank[0]["params"].items():  # noise added once and all-reduced: identical replicas
        assert torch.equal(p, per_rank[1]["params"][name]), name
