"""``flashnorm.auditing.bounds``: JAX Privacy's published calibration, the validity of the threshold search,
the attack metrics and the argument checks."""

import numpy as np
import pytest
from scipy.stats import norm

from flashnorm.auditing import auroc, epsilon_one_run, epsilon_one_run_fdp, gaussian_mu_for_epsilon, tpr_at_fpr
from flashnorm.auditing.bounds import grid_counts


def deterministic_normal(mu: float, n: int = 10_000) -> np.ndarray:
    """n scores at the quantiles (i + ½)/n of N(mu, 1)."""
    return norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + mu


# JAX Privacy, tests/auditing_test.py::test_epsilon_one_run_close: 10,000 in canaries at N(μ, 1), 10,000 out at
# N(0, 1) ("deterministic normal"), significance 0.05, δ = 1e-6; its thresholds are our correction="hull".
JAX_PRIVACY = {
    ("one_run", 0): 0.0, ("one_run", 1): 1.13346, ("one_run", 2): 2.311945, ("one_run", 4): 4.395568,
    ("fdp", 0): 0.0, ("fdp", 1): 2.164749, ("fdp", 2): 4.7218075, ("fdp", 4): 9.133752,
}
# The default correction="grid" on the same scores (recorded; a change here changes every audit).
GRID = {
    ("one_run", 0): 0.0, ("one_run", 1): 1.767494, ("one_run", 2): 3.302859, ("one_run", 4): 4.839019,
    ("fdp", 0): 0.0, ("fdp", 1): 2.329916, ("fdp", 2): 5.070708, ("fdp", 4): 9.395049,
}
BOUNDS = {"one_run": epsilon_one_run, "fdp": epsilon_one_run_fdp}


@pytest.mark.parametrize("bound,mu", sorted(JAX_PRIVACY), ids=lambda v: str(v))
def test_hull_correction_reproduces_jax_privacy(bound, mu):
    eps = BOUNDS[bound](deterministic_normal(mu), deterministic_normal(0), significance=0.05, delta=1e-6,
                        correction="hull")
    assert eps == pytest.approx(JAX_PRIVACY[bound, mu], rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("bound,mu", sorted(GRID), ids=lambda v: str(v))
def test_grid_correction_on_the_calibration_scores(bound, mu):
    eps = BOUNDS[bound](deterministic_normal(mu), deterministic_normal(0), significance=0.05, delta=1e-6)
    assert eps == pytest.approx(GRID[bound, mu], rel=1e-4, abs=1e-9)


def test_grid_is_fixed_by_the_number_of_canaries():
    counts = grid_counts(20_000)
    assert counts[0] == 1 and counts[-1] <= 20_000 and np.all(np.diff(counts) > 0)
    assert list(counts[:10]) == list(range(1, 11))
    assert len(counts) < 110  # significance / ~100 per threshold, not / 20,000
    assert np.all(counts[1:] <= np.ceil(counts[:-1] * 1.1) + 1)


def test_grid_is_valid_and_hull_is_not_when_in_and_out_scores_agree():
    """In and out scores from one distribution: ε = 0 is true, so ε̂ > 0 is a false claim. The grid makes it in
    under 5% of 400 experiments (3 of 400); the hull's data-dependent number of thresholds in 7.5% (30 of 400)."""
    rng = np.random.default_rng(0)
    false_claims = {"grid": 0, "hull": 0}
    for _ in range(400):
        ins, outs = rng.normal(size=10_000), rng.normal(size=10_000)
        for correction in false_claims:
            false_claims[correction] += epsilon_one_run(ins, outs, correction=correction) > 0
    assert false_claims["grid"] <= 0.05 * 400 < false_claims["hull"]


def test_bounds_grow_with_the_separation_and_guess_out_by_swapping():
    outs = deterministic_normal(0, 2000)
    values = [epsilon_one_run_fdp(deterministic_normal(mu, 2000), outs) for mu in (0.5, 1, 2, 4)]
    assert values[0] < values[1] < values[2] < values[3]
    ins = deterministic_normal(2, 2000)
    assert epsilon_one_run(outs, ins, delta=1e-5) == 0  # guessing "in" for the out canaries' high scores
    # guessing "out" for the lowest scores: swap and negate (a shift of one Gaussian is symmetric)
    assert epsilon_one_run(-outs, -ins, delta=1e-5) == pytest.approx(epsilon_one_run(ins, outs, delta=1e-5))
    assert epsilon_one_run(ins, outs, delta=1e-5) > 1


def test_perfect_separation_is_limited_by_the_number_of_canaries():
    few = epsilon_one_run(np.ones(50), np.zeros(50))
    many = epsilon_one_run(np.ones(5000), np.zeros(5000))
    assert 0 < few < many < 10


def test_gaussian_mu_for_epsilon_inverts_the_analytic_gaussian():
    for eps, delta in [(0.5, 1e-5), (1.0, 1e-6), (4.0, 1e-5), (8.0, 1e-3)]:
        mu = gaussian_mu_for_epsilon(eps, delta)
        d = norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        assert d == pytest.approx(delta, rel=1e-6)
    assert gaussian_mu_for_epsilon(1.0, 1e-5) < gaussian_mu_for_epsilon(2.0, 1e-5)


def test_auroc():
    assert auroc([1, 3], [0, 2]) == 0.75
    assert auroc([1.0], [1.0]) == 0.5  # a tie counts half
    assert auroc([5, 6], [1, 2]) == 1.0 and auroc([1, 2], [5, 6]) == 0.0


def test_tpr_at_fpr():
    ins, outs = [1, 3], [0, 2]
    assert tpr_at_fpr(ins, outs, 0.0) == 0.5  # score ≥ 3: one in, no out
    assert tpr_at_fpr(ins, outs, 0.25) == 0.5
    assert tpr_at_fpr(ins, outs, 0.5) == 1.0  # score ≥ 1: both in, one out of two
    np.testing.assert_array_equal(tpr_at_fpr(ins, outs, [0.0, 0.5, 1.0]), [0.5, 1.0, 1.0])
    rng = np.random.default_rng(1)
    same = rng.normal(size=(2, 20_000))
    assert tpr_at_fpr(same[0], same[1], 0.1) == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("call,match", [
    (lambda: epsilon_one_run([], [1.0]), "non-empty"),
    (lambda: epsilon_one_run([[1.0]], [1.0]), "1-D"),
    (lambda: epsilon_one_run([np.nan], [1.0]), "non-finite"),
    (lambda: epsilon_one_run([1.0], [0.0], significance=0), "significance"),
    (lambda: epsilon_one_run([1.0], [0.0], delta=1), "delta"),
    (lambda: epsilon_one_run([1.0], [0.0], correction="all"), "grid, hull"),
    (lambda: epsilon_one_run_fdp([1.0], [0.0], delta=0), "delta > 0"),
    (lambda: tpr_at_fpr([1.0], [0.0], 1.5), "fpr"),
    (lambda: gaussian_mu_for_epsilon(1.0, 0), "delta"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
