"""Which configurations a run launches, in which order, and a rough cost model for the time budget.

The ``end_to_end`` suite lists shape groups by importance; within a group non-DP runs first (the base
of the ratios), then FlashNorm's modes, then the peers. The ``tied_models`` suite measures Hugging Face's
own models with tied embeddings (GPT-2 small, Llama-3.2-1B shape) against Opacus hooks, and the peak
memory of GPT-2 with activation checkpointing against non-DP with the same checkpointing. The cost model predicts a
configuration's seconds on an H200 from model FLOPs; the runner uses it to skip what cannot fit in
the remaining budget and to report the plan (``--dry-run``). It is deliberately simple: the runner's
per-configuration limit, not the model, is what bounds the wall time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .harness import MODES, split_mode
from .models import get_workload, step_flops


@dataclass(frozen=True)
class Config:
    workload: str
    B: int
    T: int
    dtype: str
    mode: str

    @property
    def shape_key(self) -> Tuple[str, int, int, str]:
        """The group whose non-DP run is this configuration's ratio base."""
        return (self.workload, self.B, self.T, self.dtype)

    @property
    def series_key(self) -> Tuple[str, int, str, str]:
        """Same workload, batch, dtype and mode: a curve over T."""
        return (self.workload, self.B, self.dtype, self.mode)

    def as_dict(self) -> Dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.workload} B={self.B} T={self.T} {self.dtype} {self.mode}"


#: Shape groups of the end-to-end suite, most important first: (workload, dtype, B, T).
END_TO_END_GROUPS: Tuple[Tuple[str, str, int, int], ...] = (
    # The headline shapes: GPT-2 at long and batched sequences, one long linear layer.
    ("gpt2", "bf16", 1, 4096),
    ("gpt2", "bf16", 1, 16384),
    ("gpt2", "bf16", 8, 1024),
    ("linear", "fp32", 1, 65536),
    # Cheap points that complete the curves.
    ("gpt2", "bf16", 1, 1024),
    ("linear", "fp32", 1, 4096),
    ("linear", "fp32", 1, 16384),
    ("linear", "fp32", 4, 4096),
    ("linear", "fp32", 4, 16384),
    # The Llama point and the long sequences.
    ("llama1b", "bf16", 4, 4096),
    ("gpt2", "bf16", 1, 32768),
    ("linear", "fp32", 1, 262144),
    ("linear", "fp32", 4, 65536),
    # fp32 GPT where affordable (T ≥ 16384 in fp32 is not: ≈1 s per non-DP step), then the largest linear.
    ("gpt2", "fp32", 1, 1024),
    ("gpt2", "fp32", 8, 1024),
    ("gpt2", "fp32", 1, 4096),
    ("linear", "fp32", 4, 262144),
)
#: Shape groups of the tied-embeddings suite: Hugging Face models as users fine-tune them.
TIED_MODELS_GROUPS: Tuple[Tuple[str, str, int, int], ...] = (
    ("hf_gpt2_tied", "bf16", 8, 1024),
    ("hf_gpt2_tied", "bf16", 1, 4096),
    ("hf_llama1b_tied", "bf16", 2, 4096),
    ("hf_gpt2_tied_ckpt", "bf16", 1, 16384),
    ("hf_gpt2_tied_ckpt_reentrant", "bf16", 1, 16384),
)
SUITES = {"end_to_end": END_TO_END_GROUPS, "tied_models": TIED_MODELS_GROUPS}
#: The modes a suite runs unless ``--modes`` is given (default: every mode).
SUITE_MODES = {"tied_models": ("nondp", "flash_fuse", "flash", "opacus_hooks")}
#: Groups of a suite that run only some modes: with checkpointing, peak memory is the measure.
GROUP_MODES = {
    "tied_models": {("hf_gpt2_tied_ckpt", "bf16", 1, 16384): ("nondp", "flash_fuse"),
                    ("hf_gpt2_tied_ckpt_reentrant", "bf16", 1, 16384): ("nondp", "flash_fuse")},
}
#: Shape groups of a suite that also run the CUDA-graph pair (``nondp_graphed``, ``flash_fuse_graphed``):
#: the short GPT steps, where the eager step is bound by the CPU's issue rate.
GRAPHED_GROUPS = {
    "end_to_end": {("gpt2", "bf16", 1, 1024), ("gpt2", "bf16", 1, 4096), ("gpt2", "bf16", 8, 1024),
                   ("gpt2", "bf16", 1, 16384)},
}

#: Settings a suite implies unless given on the command line.
SUITE_DEFAULTS = {
    "end_to_end": dict(steps=10, warmup=3, min_timed_s=0.5, timeout=45.0, max_minutes=8.0),
    "tied_models": dict(steps=5, warmup=2, min_timed_s=0.25, timeout=40.0, max_minutes=3.0),
}


def grid_configs(workloads: Sequence[str], dtypes: Sequence[str], modes: Sequence[str], *, smoke: bool,
                 batches: Optional[Sequence[int]] = None, seqs: Optional[Sequence[int]] = None,
                 shapes: Optional[Sequence[Tuple[int, int]]] = None) -> List[Config]:
    """Every workload's shape grid (its smoke shape, or ``shapes``) × dtypes × modes, non-DP first in each group."""
    out = []
    for name in workloads:
        workload = get_workload(name)
        grid = shapes or ((workload.smoke_shape,) if smoke else workload.shapes)
        for b, t in grid:
            if (batches and b not in batches) or (seqs and t not in seqs):
                continue
            for dtype in dtypes:
                out.extend(Config(name, b, t, dtype, m) for m in _ordered(modes))
    return out


def suite_configs(suite: str, workloads: Sequence[str], dtypes: Sequence[str], modes: Sequence[str],
                  batches: Optional[Sequence[int]] = None, seqs: Optional[Sequence[int]] = None,
                  smoke: bool = False) -> List[Config]:
    """The suite's groups in priority order, filtered by the command line's workloads, dtypes, B and T
    (graphed modes only in the suite's `GRAPHED_GROUPS`, a group of `GROUP_MODES` only its modes).
    ``smoke``: each group at its workload's smoke shape in every one of ``dtypes`` (a repeated one once)."""
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}. Valid suites: {', '.join(SUITES)}.")
    out: List[Config] = []
    for group in SUITES[suite]:
        name, dtype, b, t = group
        graphed = group in GRAPHED_GROUPS.get(suite, ())
        only = GROUP_MODES.get(suite, {}).get(group, MODES)
        runs = [(d, *get_workload(name).smoke_shape) for d in dtypes] if smoke else [(dtype, b, t)]
        for dtype, b, t in runs:
            if (name not in workloads or dtype not in dtypes or (batches and b not in batches)
                    or (seqs and t not in seqs)):
                continue
            out.extend(c for c in (Config(name, b, t, dtype, m) for m in _ordered(modes)
                                   if (graphed or not split_mode(m)[1]) and m in only) if c not in out)
    return out


def _ordered(modes: Iterable[str]) -> List[str]:
    chosen = set(modes)
    return [m for m in MODES if m in chosen]


# -- cost model (H200, seconds) -------------------------------------------------------------------

#: Sustained GEMM FLOP/s: fp32 with TF32 off runs on the CUDA cores.
GEMM_RATE = {"fp32": 45e12, "bf16": 450e12}
#: FlashNorm's Triton norm kernels (fp32 dots in IEEE mode) and Opacus's Gram einsums.
NORM_RATE = {"fp32": 25e12, "bf16": 250e12}
#: Bytes per second for elementwise work (activations, noise, optimizer).
BANDWIDTH = 3.0e12
#: Process start and exit (fork, CUDA context, cuBLAS, model build, teardown); Triton compilation the first
#: time a (workload, dtype) meets a FlashNorm mode (later processes load the kernels from Triton's disk cache).
STARTUP_S = {"cuda": 1.5, "cpu": 0.3}
#: The fork server's imports (torch, opacus, flashnorm, torch._dynamo), once per run.
SERVER_START_S = 10.0
TRITON_COMPILE_S = 5.0
#: Python per trainable layer per step: the peers' hooks (Opacus hooks is 30–70 ms at GPT-2 small).
PY_PER_LAYER_S = {"nondp": 2e-5, "flash_fuse": 6e-5, "flash": 8e-5, "ghost": 8e-5, "opacus_hooks": 4e-4,
                  "opacus_ghost": 1.5e-4}
#: Opacus ghost fails at T ≥ 46341 (T² overflows int32 indexing): it ends in seconds.
OPACUS_GHOST_MAX_T = 46340


def _gram_flops(workload: str, b: int, t: int, smoke: bool) -> float:
    return sum(2.0 * b * t * t * (d + p) for d, p in get_workload(workload).linears(smoke))


def _flash_plan_flops(workload: str, b: int, t: int, smoke: bool, fused: bool) -> float:
    """Norm FLOPs under FlashNorm's planner (per_sample ≈ free in the fused mode, gram below T*, else flash)."""
    total = 0.0
    for d, p in get_workload(workload).linears(smoke):
        if fused and d * p <= t * (d + p):
            total += 0.0  # per-sample gradient replaces the assembly GEMM
        elif t < 2 * d * p / (d + p):
            total += 2.0 * b * t * t * (d + p)
        else:
            total += 2.0 * b * t * d * p
    return total


def predict_step_s(cfg: Config, smoke: bool = False) -> float:
    """Predicted step time (s) of ``cfg`` on an H200; crude, within ~2× for the workloads here."""
    w = get_workload(cfg.workload)
    n_layers = len(w.linears(smoke)) + 2 * w.attention(smoke)[0] + 2
    tokens = cfg.B * cfg.T
    flops = step_flops(cfg.workload, batch=cfg.B, seq_len=cfg.T, smoke=smoke)
    linear_flops = 6.0 * tokens * sum(d * p for d, p in w.linears(smoke))
    width = max(max(d, p) for d, p in w.linears(smoke))
    n_params = sum(d * p for d, p in w.linears(smoke))
    elementwise = 40.0 * tokens * width * max(1, len(w.linears(smoke)) // 4) / BANDWIDTH
    base = 1.25 * flops / GEMM_RATE[cfg.dtype] + elementwise + 12.0 * n_params / BANDWIDTH
    mode, graphed = split_mode(cfg.mode)
    py = 0.0 if graphed else PY_PER_LAYER_S[mode] * n_layers  # a replay issues no per-layer Python
    if mode == "nondp":
        return base + py
    noise = 16.0 * n_params / BANDWIDTH
    weight_grad = linear_flops / 3.0 / GEMM_RATE[cfg.dtype]
    if mode == "flash_fuse":
        extra = _flash_plan_flops(cfg.workload, cfg.B, cfg.T, smoke, True) / NORM_RATE[cfg.dtype]
    elif mode == "flash":
        extra = weight_grad + _flash_plan_flops(cfg.workload, cfg.B, cfg.T, smoke, False) / NORM_RATE[cfg.dtype]
    elif mode == "ghost":
        extra = weight_grad + _gram_flops(cfg.workload, cfg.B, cfg.T, smoke) / NORM_RATE[cfg.dtype]
    elif mode == "opacus_hooks":
        extra = 0.3 * base + 8.0 * cfg.B * n_params * 4 / BANDWIDTH
    elif mode == "opacus_ghost":
        if cfg.T > OPACUS_GHOST_MAX_T:
            return 0.5
        gram_bytes = 4.0 * 4 * cfg.B * cfg.T * cfg.T * len(w.linears(smoke))
        gram_s = 1.5 * _gram_flops(cfg.workload, cfg.B, cfg.T, smoke) / NORM_RATE[cfg.dtype]
        extra = weight_grad + gram_s + gram_bytes / BANDWIDTH
    else:
        raise ValueError(f"Unknown mode {mode!r}. Valid modes: {', '.join(MODES)}.")
    return base + extra + noise + py


def predict_config_s(cfg: Config, *, steps: int, warmup: int, min_timed_s: float, max_steps: int,
                     device: str = "cuda", smoke: bool = False, step_s: Optional[float] = None) -> float:
    """Predicted wall seconds of the configuration's process (start, warm-up, timed steps)."""
    from .harness import SLOW_STEP_S, SLOW_WARMUP

    step_s = predict_step_s(cfg, smoke) if step_s is None else step_s
    if device != "cuda":
        return STARTUP_S["cpu"] + (warmup + steps) * 0.05
    n_warm = SLOW_WARMUP if step_s > SLOW_STEP_S else warmup
    n_timed = max(steps, min(max_steps, int(min_timed_s / max(step_s, 1e-6)) + 1))
    return STARTUP_S["cuda"] + (n_warm + n_timed) * step_s


def scaled_prediction(cfg: Config, measured: Config, measured_ms: float, smoke: bool = False) -> float:
    """Step seconds of ``cfg`` extrapolated from a measured configuration of the same series."""
    ratio = predict_step_s(cfg, smoke) / max(predict_step_s(measured, smoke), 1e-9)
    return measured_ms / 1e3 * ratio
