"""ε and σ from Opacus's accountants where FlashNorm, not the user, picks the Rényi orders.

Opacus converts Rényi DP to (ε, δ) over a list of orders α (``RDPAccountant.DEFAULT_ALPHAS``: 1.1 to 63) and
warns "Optimal order is the largest alpha. Please consider expanding the range of alphas" when the best order is
an end of the list. A user of ``engine.get_epsilon(delta)`` or ``make_private_with_epsilon`` cannot pass orders,
so the warning only tells them that the bound might be loose. Here:

* RDP accountant (`rdp_spent`): Opacus's ``get_privacy_spent`` over its default orders, extended past the end the
  optimum sits on (up to `MAX_ORDER` and down to `MIN_ORDER`) until the optimum is interior. Every order gives
  a valid bound, so ε is the minimum over a superset: equal to Opacus's whenever Opacus's optimum is interior,
  smaller (tighter) otherwise.
* PRV accountant: its ε is a numerical composition, not an RDP bound. Opacus sizes the discretisation domain
  with an RDP bound at δ/4000 over the default orders, where the largest order is often optimal; the domain is
  valid (larger) either way, so the warning is silenced there.
* `noise_multiplier`: Opacus's ``get_noise_multiplier`` with that warning silenced; its orders are Opacus's
  defaults (σ as Opacus computes it, so ε at the end is at most the target).

An order list the user passes (``accountant.get_epsilon(delta, alphas=...)``) never comes through here.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, List, Tuple

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

#: The largest order the RDP search extends to (α ≈ √(2σ² log(1/δ) / steps) for the Gaussian mechanism: σ in the
#: hundreds at δ = 1e-5). Integer orders cost O(α) each in Opacus's analysis.
MAX_ORDER = 2**14
#: The smallest order it extends to (ε in the hundreds).
MIN_ORDER = 1.001
#: Opacus's message (``opacus.accountants.analysis.rdp.get_privacy_spent``).
OPTIMAL_ORDER_WARNING = r"Optimal order is the (largest|smallest) alpha"


@contextmanager
def orders_chosen_here() -> Iterator[None]:
    """Silences Opacus's optimal-order warning for orders FlashNorm chose, inside the block only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=OPTIMAL_ORDER_WARNING, category=UserWarning)
        yield


def rdp_spent(accountant: RDPAccountant, delta: float) -> Tuple[float, float, List[float]]:
    """(ε, its order, the orders searched) of an RDP accountant's history at ``delta``: Opacus's default orders,
    extended past the end the optimum sits on until it is interior or at `MAX_ORDER`/`MIN_ORDER`."""
    orders: List[float] = list(accountant.DEFAULT_ALPHAS)
    while True:
        with orders_chosen_here():
            eps, best = accountant.get_privacy_spent(delta=delta, alphas=orders)
        if best == orders[-1] and orders[-1] < MAX_ORDER:
            top = orders[-1]
            orders += sorted({min(MAX_ORDER, round(top * 2 ** (k / 4))) for k in range(1, 5)})
        elif best == orders[0] and orders[0] > MIN_ORDER:
            bottom = orders[0] - 1
            orders = sorted({max(MIN_ORDER, 1 + bottom / 2 ** (k / 2)) for k in range(1, 5)}) + orders
        else:  # interior, at a limit, or no privacy (ε = inf, best order NaN)
            return float(eps), float(best), orders


def epsilon(accountant: IAccountant, delta: float) -> float:
    """ε spent so far at ``delta``, for every accountant: 0 before any step, ``inf`` once any recorded step had σ = 0
    (a step without noise has no finite guarantee; Opacus's GDP and PRV accountants raise in both cases), else
    `rdp_spent` for RDP, Opacus's with the domain's warning silenced for PRV, Opacus's ``get_epsilon`` for any
    other accountant."""
    if not accountant.history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in accountant.history):
        return float("inf")
    if isinstance(accountant, RDPAccountant):
        return rdp_spent(accountant, delta)[0]
    if isinstance(accountant, PRVAccountant):
        with orders_chosen_here():
            return float(accountant.get_epsilon(delta=delta))
    return float(accountant.get_epsilon(delta=delta))


def noise_multiplier(**kwargs) -> float:
    """Opacus's ``get_noise_multiplier(**kwargs)`` (same keywords and result), without the optimal-order warning."""
    with orders_chosen_here():
        return float(get_noise_multiplier(**kwargs))
