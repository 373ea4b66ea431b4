"""What one run can resolve: the simulations behind the prose of ``docs/auditing.md`` (``python -m
tests.auditing.simulations``, numpy only, ~3 min on a CPU).

White-box canaries are independent coordinates, so their scores can be drawn directly: an in canary's per-step
movement is 1[sampled] + N(0, σ²) (in units of lr·C/B), an out canary's N(0, σ²). Each section prints the
accountant's ε beside the best ε̂ f-DP (default thresholds) and their ratio.
"""

from __future__ import annotations

import warnings

import numpy as np
from opacus.accountants import create_accountant
from scipy import optimize
from scipy.special import logsumexp
from scipy.stats import norm

from flashnorm.auditing import epsilon_one_run, epsilon_one_run_fdp
from flashnorm.auditing.bounds import gaussian_delta


def gaussian_epsilon(mu: float, delta: float) -> float:
    """ε at δ of the Gaussian mechanism with μ = sensitivity / noise."""
    return optimize.brentq(lambda e: gaussian_delta(mu, e) - delta, 0, 200)


def poisson_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = create_accountant("prv")
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta)


def deterministic_normal(mu: float, n: int) -> np.ndarray:
    return norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + mu


def both_directions(ins, outs, delta):
    return max(epsilon_one_run_fdp(ins, outs, delta=delta), epsilon_one_run_fdp(-outs, -ins, delta=delta))


def gaussian_tightness() -> None:
    print("Gaussian mechanism μ = 1, 10,000 in and 10,000 out (deterministic normal), δ = 1e-6")
    ins, outs = deterministic_normal(1, 10_000), deterministic_normal(0, 10_000)
    eps = gaussian_epsilon(1, 1e-6)
    fdp, one = epsilon_one_run_fdp(ins, outs, delta=1e-6), epsilon_one_run(ins, outs, delta=1e-6)
    print(f"  true ε {eps:.2f}; ε̂ f-DP {fdp:.2f} ({fdp / eps:.0%}); ε̂ one-run {one:.2f} ({one / eps:.0%})")


def noise_times_sqrt2() -> None:
    print("Noise σ/√2 reported for σ (Gaussian, one step), δ = 1e-5: ε̂ f-DP of the broken run / reported ε")
    for mu in (0.5, 1.0, 2.0):
        claimed = gaussian_epsilon(mu, 1e-5)
        for m in (20_000, 2_000_000):
            fdp = epsilon_one_run_fdp(deterministic_normal(mu * np.sqrt(2), m // 2), deterministic_normal(0, m // 2),
                                      delta=1e-5)
            print(f"  μ {mu}: reported ε {claimed:.2f}, m {m:>9,}: ε̂ f-DP {fdp:.2f} ({fdp / claimed:.0%})")


def _shuffled(rng, sigma: float, k: int, epochs: int, n: int = 10_000):
    """Best ε̂ f-DP for batches reshuffled each epoch and for batches shuffled once (the same every epoch)."""
    reshuffled = {True: np.zeros(n), False: np.zeros(n)}  # per-epoch log likelihood ratios, summed
    once = {True: np.zeros((n, k)), False: np.zeros((n, k))}  # each slot's movement, summed over the epochs
    for _ in range(epochs):
        for member in (True, False):
            x = rng.normal(0, sigma, (n, k))
            if member:
                x[np.arange(n), rng.integers(0, k, n)] += 1
            reshuffled[member] += logsumexp((x - 0.5) / sigma**2, axis=1) - np.log(k)
            y = rng.normal(0, sigma, (n, k))
            if member:
                y[:, 0] += 1  # slot 0 w.l.o.g.: the score is symmetric in the slots
            once[member] += y
    per_slot = {member: logsumexp((v - epochs / 2) / (epochs * sigma**2), axis=1) for member, v in once.items()}
    return (both_directions(reshuffled[True], reshuffled[False], 1e-5),
            both_directions(per_slot[True], per_slot[False], 1e-5))


def shuffling(rng) -> None:
    print("Shuffled batches reported as Poisson, 20,000 canaries, δ = 1e-5, per-step likelihood-ratio scores")
    worst = {"reshuffled": 0.0, "once": 0.0}
    grid = [(s, k, e) for s in (0.5, 0.7, 1.0, 1.5, 2.0) for k in (2, 10, 30) for e in (1, 4, 16)]
    for sigma, k, epochs in grid + [(0.5, 1000, 16)]:
        claimed = poisson_epsilon(sigma, 1 / k, epochs * k, 1e-5)
        fresh, fixed = _shuffled(rng, sigma, k, epochs)
        if k <= 30:
            worst["reshuffled"] = max(worst["reshuffled"], fresh / claimed)
            worst["once"] = max(worst["once"], fixed / claimed)
        print(f"  σ {sigma} batches/epoch {k:>4} epochs {epochs:>2}: reported ε {claimed:6.2f}; ε̂ f-DP reshuffled "
              f"each epoch {fresh:5.2f} ({fresh / claimed:.0%}), shuffled once {fixed:5.2f} ({fixed / claimed:.0%})")
    print(f"  highest ratio up to 30 batches per epoch: reshuffled {worst['reshuffled']:.0%}, once {worst['once']:.0%}")


def fdp_on_dp_sgd(rng) -> None:
    print("Correct DP-SGD (Poisson subsampled Gaussian), 200,000 canaries, exact likelihood-ratio scores, δ = 1e-5")
    n = 100_000
    worst = 0.0
    for sigma in (0.3, 0.4, 0.71, 1.15):
        for q, steps in ((0.5, 2), (0.1, 10), (0.01, 100)):
            def draw(member):
                x = rng.normal(0, sigma, (n, steps))
                return x + (rng.random((n, steps)) < q) if member else x

            def ratio(x):
                return np.log(1 - q + q * np.exp((x - 0.5) / sigma**2)).sum(1)

            claimed = poisson_epsilon(sigma, q, steps, 1e-5)
            found = both_directions(ratio(draw(True)), ratio(draw(False)), 1e-5)
            worst = max(worst, found / claimed)
            print(f"  σ {sigma} q {q} steps {steps}: ε {claimed:6.2f}, ε̂ f-DP {found:5.2f} ({found / claimed:.0%})")
    print(f"  highest ratio: {worst:.0%}")


def main() -> None:
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    gaussian_tightness()
    noise_times_sqrt2()
    shuffling(rng)
    fdp_on_dp_sgd(rng)


if __name__ == "__main__":
    main()
