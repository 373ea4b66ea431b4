"""Per layer and per call, the cheapest exact norm method.

For a Linear-family layer with flattened sizes (B, T, d, p), N = B·T·d·p:

* ``flash``       2N FLOPs, O(B) memory;
* ``gram``        ≈ B·T²·(d+p) FLOPs, O(B) memory: chosen when T < κ·2dp/(d+p), where κ is the Gram
  kernel's throughput relative to the flash kernel's: about half in bf16, so with a full GPU (B × output
  tiles ≥ the SM count) κ = 0.5; when flash under-fills the GPU (e.g. B = 1) Gram's extra parallelism helps
  (κ = 1.0), but Gram has too few programs at T ≤ 256. Off the GPU the PyTorch references run: flash forms
  each sample's gradient tile by tile (2N FLOPs, and B·d·p elements written and read back), so there are no
  multiprocessors to fill and κ = 0.5 at every B. Below float64, Gram only up to
  `GRAM_FLOAT32_MAX_STEPS` positions, where its float32 rounding stays inside
  the clipping coefficient's allowance on ordinary inputs (`rounding`): so T = 1 (rank
  one) and short sequences on a full GPU;
* ``per_sample``  (one-pass mode only) 2N FLOPs and B·d·p memory, but it replaces the
  assembly GEMM (another 2N) and the stored X, G. Chosen when the per-sample gradients take no
  more memory than the X and G they replace (d·p ≤ T·(d+p)) and fit ``PER_SAMPLE_BUDGET_BYTES``.
  They are written by cuBLAS ``bmm`` (`per_sample_weight_grads`).

Other rules have one method. The choice can be forced per model (``norm_method=`` of ``make_private`` or of the grad-sample
module; ``FLASHNORM_NORM_METHOD`` is only its default), and it is logged at DEBUG level.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from .registry import METHODS
from .rounding import GRAM_FLOAT32_MAX_STEPS

logger = logging.getLogger(__name__)

#: The modes' algorithms (``Mode.norm_algorithm``): what the planner starts from.
ALGORITHMS = ("flash", "gram", "per_sample")

#: κ (see above): multiplier on the FLOP-equality bound T* = 2dp/(d+p) below which Gram is used.
GRAM_CROSSOVER_FILLED = 0.5
GRAM_CROSSOVER_UNDERFILLED = 1.0
#: Below this T an under-filled Gram launch has too few programs to beat flash (H200).
GRAM_MIN_SEQ_LEN_UNDERFILLED = 256
#: Output tile of the flash kernel (for counting programs) and the H200's multiprocessors.
FLASH_TILE = 128
SM_COUNT = 132
#: Largest per-sample gradient (bytes, one layer) the one-pass mode may materialise.
PER_SAMPLE_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class Problem:
    """Sizes of one layer's norm problem."""

    batch: int
    seq_len: int
    d: int
    p: int
    element_bytes: int = 4
    gpu: bool = True  # the norms run as the GPU kernels (else the PyTorch references)


def resolve_norm_method(value: Optional[str]) -> Optional[str]:
    """The forced norm method, or ``None`` when the planner chooses (``"auto"``).

    ``value=None`` reads ``FLASHNORM_NORM_METHOD`` (unset or empty: ``"auto"``).

    Raises:
        ValueError: an unknown method (named with where it came from).
    """
    source = "norm_method"
    if value is None:
        source, value = "FLASHNORM_NORM_METHOD", os.environ.get("FLASHNORM_NORM_METHOD", "")
    value = value.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in METHODS:
        raise ValueError(f"{source}={value!r} is not one of auto, {', '.join(METHODS)}.")
    return value


def plan_linear(problem: Problem, *, base: str, fused: bool) -> str:
    """Method for a Linear-family layer.

    Args:
        problem: flattened sizes.
        base: the mode's algorithm: ``"gram"`` (ghost), ``"flash"`` (planned), ``"per_sample"``.
        fused: one-pass mode (per-sample gradients may replace the stored X, G).
    """
    if base in ("gram", "per_sample"):
        return base
    b, t, d, p = problem.batch, problem.seq_len, problem.d, problem.p
    if fused and d * p <= t * (d + p) and b * d * p * problem.element_bytes <= PER_SAMPLE_BUDGET_BYTES:
        return "per_sample"
    tiles = -(-d // FLASH_TILE) * -(-p // FLASH_TILE)
    if not problem.gpu or b * tiles >= SM_COUNT:
        kappa = GRAM_CROSSOVER_FILLED
    elif t <= GRAM_MIN_SEQ_LEN_UNDERFILLED and t > 1:
        return "flash"
    else:
        kappa = GRAM_CROSSOVER_UNDERFILLED
    if t < kappa * 2 * d * p / max(1, d + p) and (problem.element_bytes == 8 or t <= GRAM_FLOAT32_MAX_STEPS):
        return "gram"
    return "flash"


def choose(rule, layer, x, g, *, base: str, fused: bool, override: Optional[str], name: str) -> str:
    """The method for this call: ``override`` (a forced method), else the plan.

    Every rule can do ``"per_sample"``; a forced method the rule lacks is ignored for that layer.
    """
    method = override
    if method != "per_sample" and method not in rule.methods:
        if base == "per_sample":
            method = "per_sample"
        elif "flash" in rule.methods:
            batch, seq_len, d, p = rule.sizes(layer, x, g)
            problem = Problem(batch, seq_len, d, p, g.element_size(), gpu=x.is_cuda)
            method = plan_linear(problem, base=base, fused=fused)
        else:
            method = rule.methods[0]
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("norm plan: %s (%s) x=%s g=%s -> %s", name, type(layer).__name__, tuple(x.shape), tuple(g.shape), method)
    return method
