"""Lower bounds on ε from canary scores, and the usual membership-inference metrics (numpy and scipy only).

A canary is *in* (it was in the training set) or *out*. An attack gives each canary a score, higher meaning
"more likely in". The auditor guesses "in" for every canary scoring at least a threshold t and abstains on
the others; with r guesses of which v are right, a mechanism that is (ε, δ)-DP makes v unlikely to be large.
Each function below turns the scores into the largest ε that such a mechanism is shown, at the given
significance, **not** to satisfy: a statistically valid lower bound ε̂ on the ε the run really has.

* [epsilon_one_run][flashnorm.auditing.bounds.epsilon_one_run]: Steinke, Nasr and Jagielski, "Privacy
  Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846). If the canaries were included
  independently with probability ½, the number of right guesses of an (ε, 0)-DP mechanism is dominated by
  Binomial(r, e^ε / (1 + e^ε)); δ > 0 adds a term of order 2mδ (their bound for approximate DP).
* [epsilon_one_run_fdp][flashnorm.auditing.bounds.epsilon_one_run_fdp]: Mahloujifar, Melis and Chaudhuri,
  "Auditing f-Differential Privacy in One Run" (ICML 2025, arXiv:2410.22235). The same experiment, tested
  against the whole trade-off curve of the Gaussian mechanism that has the claimed (ε, δ): much tighter for
  DP-SGD, whose curve is close to Gaussian.

**Which thresholds.** Choosing t after looking at the scores is a multiple test. The default,
``correction="grid"``, tests the guess sets "the r highest scores" for r on a fixed geometric grid (every r up to
10, then r growing by 10% a step; about 100 values for 20,000 canaries) and divides the significance by the
number of grid values (Bonferroni). The grid depends on the number of canaries only, so the bound is valid.
``"hull"`` is JAX
Privacy's convention (its ``CanaryScoreAuditor``): it tests the vertices of the ROC curve's upper convex hull
at significance / (number of vertices). It reproduces that library's published values, but the number of
vertices depends on the scores, which makes the correction too small: with identically distributed in and
out scores (ε = 0) it reports ε̂ > 0 in 7–8% of experiments at significance 0.05
(``tests/auditing/test_bounds.py``). Use it to compare with JAX Privacy, not as evidence.

Tied scores are never split: a guess set holds every canary scoring at least t, so nothing depends on the
order the canaries are listed in. To guess "out" for the lowest scores instead (confident non-members), swap and
negate: ``epsilon_one_run(-out_scores, -in_scores)`` bounds the same ε, since (ε, δ)-DP is symmetric in the two
neighbouring datasets.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple, Union

import numpy as np
from scipy import optimize, spatial, special, stats

__all__ = [
    "auroc",
    "epsilon_one_run",
    "epsilon_one_run_fdp",
    "gaussian_mu_for_epsilon",
    "tpr_at_fpr",
]

CORRECTIONS = ("grid", "hull")
GRID_RATIO = 1.1
_EPS_MAX = 200.0  # e^200 ≈ 7e86: every one-run bound has left the bracket long before


# -- the guess sets ----------------------------------------------------------------------------------------

def _scores(in_scores, out_scores) -> Tuple[np.ndarray, np.ndarray]:
    ins = np.asarray(in_scores, dtype=np.float64)
    outs = np.asarray(out_scores, dtype=np.float64)
    for name, s in (("in_scores", ins), ("out_scores", outs)):
        if s.ndim != 1 or s.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {s.shape}.")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} holds non-finite values; score every canary with a finite number.")
    return ins, outs


def _roc_counts(ins: np.ndarray, outs: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every distinct score t, from the highest down: (t, #in ≥ t, #out ≥ t)."""
    thresholds = np.unique(np.concatenate([ins, outs]))[::-1]
    tp = ins.size - np.searchsorted(np.sort(ins), thresholds, side="left")
    fp = outs.size - np.searchsorted(np.sort(outs), thresholds, side="left")
    return thresholds, tp, fp


def _guess_counts(r: np.ndarray, ins: np.ndarray, outs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(guesses, right guesses) when guessing "in" for every score ≥ the r-th highest, ties included."""
    everything = np.sort(np.concatenate([ins, outs]))[::-1]
    t = everything[r - 1]
    right = ins.size - np.searchsorted(np.sort(ins), t, side="left")
    wrong = outs.size - np.searchsorted(np.sort(outs), t, side="left")
    return right + wrong, right


def _upper_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the vertices of the upper convex hull of points from (x[0], y[0]) to (x[-1], y[-1]).

    Collinear points are not vertices. The points are an ROC curve's, so every point lies on or above the
    chord joining the two ends only where it is on the upper hull's side."""
    ends = np.array([0, len(x) - 1])
    try:
        hull = spatial.ConvexHull(np.stack([x, y], axis=1)).vertices
    except spatial.QhullError:  # every point on one line
        return ends
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    above = dx * (y[hull] - y[0]) - dy * (x[hull] - x[0]) > 0
    return np.unique(np.concatenate([ends, hull[above]]))


def grid_counts(m: int, ratio: float = GRID_RATIO) -> np.ndarray:
    """The fixed grid of guess counts r (1 ≤ r ≤ m) that ``correction="grid"`` tests: 1, 2, …, then ×``ratio``."""
    r, counts = 1.0, []
    while r <= m:
        counts.append(int(math.floor(r)))
        r = max(r * ratio, math.floor(r) + 1.0)
    return np.unique(np.asarray(counts, dtype=np.int64))


def _candidates(ins, outs, significance: float, correction: str):
    """The tested guess sets as (guesses, right guesses) arrays, and the per-test significance."""
    m = ins.size + outs.size
    if correction == "grid":
        counts = grid_counts(m)
        guesses, right = _guess_counts(counts, ins, outs)
        return guesses, right, significance / len(counts)
    if correction == "hull":
        _, tp, fp = _roc_counts(ins, outs)
        fp = np.concatenate([[0], fp])  # the empty guess set (t = +inf) is a vertex of the curve
        tp = np.concatenate([[0], tp])
        vertices = _upper_hull(fp.astype(np.float64), tp.astype(np.float64))
        return fp[vertices] + tp[vertices], tp[vertices], significance / len(vertices)
    raise ValueError(f"Unknown correction {correction!r}; valid: {', '.join(CORRECTIONS)}.")


def _check(significance: float, delta: float) -> None:
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}.")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}.")


def _largest_rejected(rejects: Callable[[float], float], low: float) -> float:
    """sup{ε ≥ low : rejects(ε) > 0}, for a margin that is positive below its root and ≤ 0 above it.

    Returns ``low`` when ``low`` itself is not rejected."""
    if rejects(low) <= 0:
        return low
    high = max(1.0, 2.0 * low)
    while rejects(high) > 0:
        low, high = high, 2.0 * high
        if high > _EPS_MAX:
            return _EPS_MAX
    return optimize.brentq(rejects, low, high, xtol=1e-10, rtol=1e-12)


# -- one run, (ε, δ) (Steinke, Nasr and Jagielski 2023) ------------------------------------------------------

def _one_run_p_value(m: int, guesses: int, right: int, eps: float, delta: float) -> float:
    """P[right guesses ≥ ``right``] under (ε, δ)-DP, bounded as in Steinke et al. (2023).

    With q = e^ε/(1 + e^ε) and β = P[Binomial(guesses, q) ≥ right], the bound is β for δ = 0 and
    β + 2mδ · max_{1 ≤ i ≤ right} P[right − i ≤ Binomial(guesses, q) < right] / i otherwise.
    """
    q = special.expit(eps)
    beta = stats.binom.sf(right - 1, guesses, q)
    if delta == 0 or right == 0:
        return float(beta)
    i = np.arange(1, right + 1)
    between = stats.binom.sf(right - i - 1, guesses, q) - beta  # P[right − i ≤ X < right]
    return float(min(1.0, beta + 2 * m * delta * np.max(between / i)))


def _eps_pure_bounds(guesses: np.ndarray, right: np.ndarray, alpha: float) -> np.ndarray:
    """For every guess set at once, the largest ε rejected with δ = 0: an upper bound on its δ > 0 value."""
    lo = np.zeros(len(guesses))
    hi = np.full(len(guesses), _EPS_MAX)
    live = (right > 0) & (stats.binom.sf(right - 1, guesses, 0.5) <= alpha)
    for _ in range(80):  # bisection to 200 · 2⁻⁸⁰
        mid = (lo + hi) / 2
        ok = stats.binom.sf(right - 1, guesses, special.expit(mid)) <= alpha
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return np.where(live, lo, 0.0)


def epsilon_one_run(
    in_scores: Sequence[float],
    out_scores: Sequence[float],
    *,
    significance: float = 0.05,
    delta: float = 0.0,
    correction: str = "grid",
) -> float:
    """Lower bound ε̂ on a run's ε from one run with canaries (Steinke, Nasr and Jagielski 2023).

    Each canary must have been included independently with probability ½ (the
    [canary helper][flashnorm.auditing.canaries.CanaryAudit] does that). With probability at least
    1 − ``significance`` over that draw and the run's randomness, a mechanism that is (ε, ``delta``)-DP for
    its canaries gives ε̂ ≤ ε.

    Args:
        in_scores: attack scores of the canaries that were in the training set, shape [m_in].
        out_scores: scores of those that were not, shape [m_out]; m = m_in + m_out.
        significance: the allowed probability of a false claim (0.05: 95% confidence).
        delta: the δ of the (ε, δ) claim being tested.
        correction: which thresholds are searched and how the significance is shared among them:
            ``"grid"`` (default) or ``"hull"`` (JAX Privacy's convention, not valid; see the module's
            introduction).

    Returns:
        ε̂ ≥ 0 (0 when no claim is rejected).

    Example:
        >>> import numpy as np
        >>> from scipy.stats import norm
        >>> u = np.linspace(0, 1, 10_000, endpoint=False) + 1 / 20_000
        >>> round(epsilon_one_run(norm.ppf(u) + 2, norm.ppf(u), delta=1e-6, correction="hull"), 4)
        2.3119
    """
    _check(significance, delta)
    ins, outs = _scores(in_scores, out_scores)
    m = ins.size + outs.size
    guesses, right, alpha = _candidates(ins, outs, significance, correction)
    upper = _eps_pure_bounds(guesses, right, alpha)
    if delta == 0:
        return float(upper.max(initial=0.0))
    best = 0.0
    for j in np.argsort(-upper):  # most promising first; stop once no guess set can beat the best
        if upper[j] <= best:
            break
        g, v = int(guesses[j]), int(right[j])
        best = _largest_rejected(lambda e: alpha - _one_run_p_value(m, g, v, e, delta), best)
    return float(best)


# -- one run, f-DP (Mahloujifar, Melis and Chaudhuri 2024) ---------------------------------------------------

def gaussian_delta(mu: float, eps: float) -> float:
    """δ(ε) of μ-GDP (the Gaussian mechanism of sensitivity 1 and noise 1/μ): Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    if mu <= 0:
        return 0.0
    return float(special.ndtr(-eps / mu + mu / 2) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2))


def gaussian_mu_for_epsilon(epsilon: float, delta: float) -> float:
    """The μ of the Gaussian mechanism that is exactly (ε, δ)-DP (Balle and Wang 2018, analytic Gaussian).

    Its trade-off curve f_μ(x) = Φ(Φ⁻¹(1 − x) − μ) is the curve that
    [epsilon_one_run_fdp][flashnorm.auditing.bounds.epsilon_one_run_fdp] tests.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) for a Gaussian curve, got {delta}.")
    if epsilon < 0:
        raise ValueError(f"epsilon must be ≥ 0, got {epsilon}.")
    high = 1.0
    while gaussian_delta(high, epsilon) < delta:
        high *= 2.0
    return optimize.brentq(lambda mu: gaussian_delta(mu, epsilon) - delta, 0.0, high, xtol=1e-14, rtol=1e-14)


def _fdp_margin(mu: float, m: int, guesses: int, right: int, alpha: float) -> float:
    """> 0 when ``right`` right guesses out of ``guesses`` rule out μ-GDP at level ``alpha``.

    Mahloujifar et al.'s bound for guessing with abstentions. Suppose P[≥ ``right`` right] were ``alpha``.
    Going down from ``right`` right guesses to none, ``hit`` and ``miss`` are the least probability mass
    (per canary) that the right and the wrong guesses must then carry: each step, f-DP forces the wrong
    guesses' mass up to at least γ⁻¹(hit), with γ⁻¹(x) = Φ(Φ⁻¹(x) − μ) the inverse of the curve's blow-up
    function, and the right guesses' mass follows in proportion i / (guesses − i). When the masses exceed
    the guesses made (hit + miss > guesses / m), no μ-GDP mechanism can produce that many right guesses
    with probability ``alpha``: the claim is rejected.
    """
    hit = alpha * right / m
    miss = alpha * (guesses - right) / m
    for i in range(right - 1, -1, -1):
        floor = float(special.ndtr(special.ndtri(hit) - mu))
        if floor <= miss:
            break  # nothing changes any more
        hit = min(1.0, hit + i / (guesses - i) * (floor - miss))
        miss = floor
    return hit + miss - guesses / m


def epsilon_one_run_fdp(
    in_scores: Sequence[float],
    out_scores: Sequence[float],
    *,
    significance: float = 0.05,
    delta: float = 1e-5,
    correction: str = "grid",
) -> float:
    """Lower bound ε̂ from one run, testing Gaussian trade-off curves (Mahloujifar, Melis and Chaudhuri 2024).

    ε̂ is the largest ε for which the Gaussian mechanism's curve with that (ε, ``delta``), μ =
    [gaussian_mu_for_epsilon][flashnorm.auditing.bounds.gaussian_mu_for_epsilon](ε, δ), is rejected.
    DP-SGD's privacy *is* (close to) such a curve, which makes this bound much tighter than
    [epsilon_one_run][flashnorm.auditing.bounds.epsilon_one_run]: read ε̂ as "the run is not μ-GDP for any μ
    whose (ε, δ) is below ε̂", a claim about the Gaussian family that DP-SGD's accountants assume.
    Same requirements, arguments and thresholds as `epsilon_one_run`; ``delta`` must be > 0.

    Example (JAX Privacy's calibration case μ = 2):
        >>> import numpy as np
        >>> from scipy.stats import norm
        >>> out_scores = norm.ppf((np.arange(10_000) + 0.5) / 10_000)
        >>> round(epsilon_one_run_fdp(out_scores + 2, out_scores, delta=1e-6, correction="hull"), 4)
        4.7218
    """
    _check(significance, delta)
    if delta == 0:
        raise ValueError("epsilon_one_run_fdp tests Gaussian curves, which need delta > 0.")
    ins, outs = _scores(in_scores, out_scores)
    m = ins.size + outs.size
    guesses, right, alpha = _candidates(ins, outs, significance, correction)
    mus: dict = {}

    def margin(eps: float, g: int, v: int) -> float:
        if eps not in mus:
            mus[eps] = gaussian_mu_for_epsilon(eps, delta)
        return _fdp_margin(mus[eps], m, g, v, alpha)

    best = 0.0
    for j in np.argsort(-(right / np.maximum(guesses, 1)), kind="stable"):  # precise guess sets first
        g, v = int(guesses[j]), int(right[j])
        if v == 0 or margin(best, g, v) <= 0:
            continue
        best = _largest_rejected(lambda e: margin(e, g, v), best)
    return float(best)


# -- attack metrics ----------------------------------------------------------------------------------------

def auroc(in_scores: Sequence[float], out_scores: Sequence[float]) -> float:
    """Area under the ROC curve: P[in score > out score] + ½ P[tie] (the Mann–Whitney statistic).

    0.5 is chance; 1.0 separates every in canary from every out canary.
    """
    ins, outs = _scores(in_scores, out_scores)
    ranks = stats.rankdata(np.concatenate([ins, outs]))  # ties share the mean rank
    return float((ranks[: ins.size].sum() - ins.size * (ins.size + 1) / 2) / (ins.size * outs.size))


def tpr_at_fpr(
    in_scores: Sequence[float], out_scores: Sequence[float], fpr: Union[float, Sequence[float]]
) -> Union[float, np.ndarray]:
    """The highest true-positive rate of a threshold whose false-positive rate is at most ``fpr``.

    Thresholds only (no randomised mixtures): guessing "in" for scores ≥ t gives TPR = #in ≥ t / m_in at
    FPR = #out ≥ t / m_out. ``fpr`` may be a scalar or an array (the result has its shape).
    """
    ins, outs = _scores(in_scores, out_scores)
    target = np.asarray(fpr, dtype=np.float64)
    if np.any((target < 0) | (target > 1)):
        raise ValueError(f"fpr must be in [0, 1], got {fpr}.")
    _, tp, fp = _roc_counts(ins, outs)
    tpr = np.concatenate([[0.0], tp / ins.size])  # the empty guess set first
    rate = np.concatenate([[0.0], fp / outs.size])
    # rate is non-decreasing: the last threshold with rate ≤ target has the highest TPR among them
    last = np.searchsorted(rate, target, side="right") - 1
    result = tpr[last]
    return float(result) if np.ndim(result) == 0 else result
