"""One benchmark configuration, run inside its own (forked) process: build, warm up, time, report.

A configuration is a dict ``{workload, B, T, dtype, mode, device, smoke, steps, warmup, min_timed_s,
max_steps}``. `child_main` is the process target: it sends ``("progress", {...})`` after every
step and one ``("result", record)`` at the end through a pipe, so the parent keeps what was measured
even when it has to kill a configuration that runs past its time limit.

Timing: before each step the device is synchronised; a CUDA event is recorded, the whole step runs
(forward, loss, backward, ``optimizer.step()``, ``optimizer.zero_grad()``, Python included), a second
event is recorded and the device synchronised again. The step time is the event interval: GPU time
when the GPU is the bottleneck, the CPU's issue time when it starves. ``ms`` is the median over the
timed steps (at least ``steps``, more for short steps until ``min_timed_s`` is reached). Peak memory
is ``torch.cuda.max_memory_allocated`` over the timed steps (reset after warm-up); on CPU it is the
process's max RSS (a rough figure). ``*_graphed`` modes hold their graphs' private pool, reserved at
capture and counted as allocated only then: for them the cache is emptied after warm-up and the peak is
``torch.cuda.max_memory_reserved`` over the timed steps (the pool plus the eager tail's allocations).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
import traceback
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .models import build_model, count_parameters, get_workload, make_batch

#: All modes, in the order the runner launches them within one shape (non-DP first: the ratios' base).
#: ``*_graphed``: the same step with forward, loss and backward replayed from CUDA graphs
#: (`flashnorm.cuda_graphs.CudaGraphStep`); their ratios are to ``nondp_graphed``.
MODES = ("nondp", "flash_fuse", "flash", "ghost", "opacus_hooks", "opacus_ghost", "nondp_graphed", "flash_fuse_graphed")
GRAPHED = "_graphed"
#: The mode string each DP mode passes to ``make_private`` and the engine it uses.
ENGINES = {
    "opacus_hooks": ("opacus", "hooks"),
    "opacus_ghost": ("opacus", "ghost"),
    "ghost": ("flashnorm", "ghost"),
    "flash": ("flashnorm", "flash"),
    "flash_fuse": ("flashnorm", "flash_fuse"),
}
DTYPES = ("fp32", "bf16")

NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 1e-4
#: Warm-up is cut to this many steps once a step takes longer than ``SLOW_STEP_S`` (the first step compiles).
SLOW_WARMUP = 2
SLOW_STEP_S = 0.5


class BenchmarkTimeout(Exception):
    """The configuration cannot finish its steps within its time limit (measured, not guessed)."""


def split_mode(mode: str) -> Tuple[str, bool]:
    """(the step's mode, replayed from CUDA graphs?): ``"flash_fuse_graphed"`` → ``("flash_fuse", True)``."""
    if mode.endswith(GRAPHED):
        return mode[: -len(GRAPHED)], True
    return mode, False


def ratio_base(mode: str) -> str:
    """The non-DP mode a mode's ratios are taken to: the step of the same kind (eager or graphed)."""
    return "nondp" + GRAPHED if split_mode(mode)[1] else "nondp"


def is_flashnorm(mode: str) -> bool:
    """FlashNorm's own modes (Triton kernels, planner), graphed or not."""
    return ENGINES.get(split_mode(mode)[0], ("",))[0] == "flashnorm"


def autocast_context(dtype: str, device: torch.device):
    """bf16 autocast on ``device``, or nothing for fp32."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype != "fp32":
        raise ValueError(f"Unknown dtype {dtype!r}. Valid dtypes: {', '.join(DTYPES)}.")
    return contextlib.nullcontext()


def set_precision_flags() -> None:
    """fp32 means fp32: TF32 off for cuBLAS and cuDNN (and hence for FlashNorm's fp32 Triton dots)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _dummy_loader(batch: int):
    """A loader of 8 batches of ``batch`` (never iterated): Opacus derives sample rate 1/8 and expected batch B."""
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.zeros(8 * batch, 1)), batch_size=batch)


def make_step(cfg: Dict, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
              region: Optional[Callable[[str], contextlib.AbstractContextManager]] = None) -> Callable[[], None]:
    """The training step of ``cfg["mode"]`` as a closure; wraps ``model`` with the mode's privacy engine.

    ``region(name)``, when given, wraps the step's phases (``forward``, ``loss``, ``backward``,
    ``optimizer.step``, ``optimizer.zero_grad``) for `benchmarks.overhead`. With a ``*_graphed``
    mode the forward, loss and backward run through
    `flashnorm.cuda_graphs.CudaGraphStep` (phase ``graph``: input copy and replay).
    """
    (mode, graphed), device = split_mode(cfg["mode"]), torch.device(cfg["device"])
    batch, seq_len = targets.shape
    classes = get_workload(cfg["workload"]).classes(cfg["smoke"])
    shape = (batch, seq_len, classes)
    flat_targets = targets.reshape(-1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    amp = lambda: autocast_context(cfg["dtype"], device)  # noqa: E731

    phase = region or (lambda name: contextlib.nullcontext())
    if mode == "nondp" or mode == "opacus_hooks":
        criterion = nn.CrossEntropyLoss()  # mean over B·T = mean over b of the per-sequence mean
        loss_kwargs = {}
        if mode == "opacus_hooks":
            from opacus import PrivacyEngine

            model, optimizer, _ = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=_dummy_loader(batch),
                noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                grad_sample_mode="hooks", poisson_sampling=False,
            )
    else:
        if mode not in ENGINES:
            raise ValueError(f"Unknown mode {mode!r}. Valid modes: {', '.join(MODES)}.")
        engine_name, grad_sample_mode = ENGINES[mode]
        if engine_name == "opacus":
            from opacus import PrivacyEngine as Engine
        else:
            from flashnorm import FlashNormPrivacyEngine as Engine
        model, optimizer, criterion, _ = Engine().make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=_dummy_loader(batch),
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
            grad_sample_mode=grad_sample_mode, poisson_sampling=False,
        )
        loss_kwargs = {"shape": shape}  # token-level loss, the sequence as privacy unit

    def forward_and_loss(inputs, flat_targets):
        with amp():
            with phase("forward"):
                logits = model(inputs).view(-1, classes)
            with phase("loss"):
                return criterion(logits, flat_targets, **loss_kwargs)

    if graphed:
        if mode.startswith("opacus"):
            raise ValueError(f"{mode}{GRAPHED}: {mode} keeps per-sample gradients in Python lists; no graph can replay it.")
        from flashnorm.cuda_graphs import CudaGraphStep

        graphed = CudaGraphStep(model, forward_and_loss)

        def step():
            with phase("graph"):
                graphed(inputs, flat_targets)
            with phase("optimizer.step"):
                optimizer.step()
            with phase("optimizer.zero_grad"):
                optimizer.zero_grad()

        return step

    def step():
        loss = forward_and_loss(inputs, flat_targets)
        with phase("backward"):
            loss.backward()
        with phase("optimizer.step"):
            optimizer.step()
        with phase("optimizer.zero_grad"):
            optimizer.zero_grad()

    return step


class StepTimer:
    """Times one step: CUDA events between two synchronisations on GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, step: Callable[[], None]) -> tuple:
        if not self.cuda:
            t0 = time.perf_counter()
            step()
            wall = (time.perf_counter() - t0) * 1e3
            return wall, wall
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        return start.elapsed_time(end), wall


class _PlanCounter(logging.Handler):
    """Counts FlashNorm's per-layer norm plans (the planner logs them at DEBUG level)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.counts: Dict[str, int] = {}

    def emit(self, record):
        if record.args:
            method = record.args[-1]
            self.counts[method] = self.counts.get(method, 0) + 1


@contextlib.contextmanager
def _count_plans(enabled: bool):
    if not enabled:
        yield None
        return
    logger = logging.getLogger("flashnorm.norms.planner")
    handler, level, propagate = _PlanCounter(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _is_oom(err: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", MemoryError)
    if isinstance(err, (oom_type, MemoryError)):
        return True
    text = str(err).lower()
    return "out of memory" in text or "cublas_status_alloc_failed" in text


def _gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def run_config(cfg: Dict, limit_s: float, progress: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Runs one configuration; returns its record (never raises for OOM, errors or timeouts).

    Args:
        cfg: the configuration (see the module docstring).
        limit_s: seconds this process may take in all, from the call; warm-up stops early with status
            ``timeout`` when the measured step time says the timed steps cannot fit.
        progress: called with ``{"phase", "ms"}`` after each step.
    """
    t_begin = time.perf_counter()
    device = torch.device(cfg["device"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)  # set_device, events and memory stats want an index
    record: Dict = {k: cfg[k] for k in ("workload", "B", "T", "dtype", "mode")}
    record.update(status="ok", message="", phase="setup", device=str(device))
    steps_seen = {"warmup": [], "timed": []}
    try:
        set_precision_flags()
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            record["gpu"] = torch.cuda.get_device_name(device)
        model = build_model(cfg["workload"], seq_len=cfg["T"], smoke=cfg["smoke"], device=device)
        record["params"] = count_parameters(model)
        inputs, targets = make_batch(cfg["workload"], batch=cfg["B"], seq_len=cfg["T"], smoke=cfg["smoke"],
                                     device=device)
        step = make_step(cfg, model, inputs, targets)
        timer = StepTimer(device)
        record["setup_s"] = round(time.perf_counter() - t_begin, 3)

        record["phase"] = "warmup"
        warmup = max(1, int(cfg["warmup"]))
        with _count_plans(is_flashnorm(cfg["mode"])) as plans:
            plan_seen: Dict[str, int] = {}
            for i in range(warmup):
                ms, _ = timer(step)
                if plans is not None and plans.counts:  # the planner may cache: keep the last step that planned
                    plan_seen = dict(plans.counts)
                    plans.counts.clear()
                steps_seen["warmup"].append(ms)
                if progress:
                    progress({"phase": "warmup", "ms": ms})
                last_s = ms / 1e3
                planned = SLOW_WARMUP if last_s > SLOW_STEP_S else warmup
                warmup_left = max(0, min(planned, warmup) - i - 1)
                left = limit_s - (time.perf_counter() - t_begin) - 1.0
                need = (warmup_left + cfg["steps"]) * last_s
                # The first step compiles (Triton JIT) and allocates: judge the pace from the second on.
                if i > 0 and need > left:
                    raise BenchmarkTimeout(
                        f"one step takes ≈{last_s:.2f} s (warm-up step {i + 1}); {warmup_left} more warm-up and "
                        f"{cfg['steps']} timed steps cannot finish within the {limit_s:.0f} s limit"
                    )
                if warmup_left == 0:
                    break
        if plans is not None:
            record["plan"] = dict(sorted(plan_seen.items()))

        record["phase"] = "timed"
        step_s = steps_seen["warmup"][-1] / 1e3
        n_timed = max(cfg["steps"], min(cfg["max_steps"], math.ceil(cfg["min_timed_s"] / max(step_s, 1e-6))))
        graphed = split_mode(cfg["mode"])[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
            record["static_gib"] = round(_gib(torch.cuda.memory_allocated(device)), 4)
            if graphed:  # keep only what the timed steps hold: the graphs' pool and the eager tail
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        walls = []
        for i in range(n_timed):
            ms, wall = timer(step)
            steps_seen["timed"].append(ms)
            walls.append(wall)
            if progress:
                progress({"phase": "timed", "ms": ms})
            if i + 1 >= cfg["steps"] and limit_s - (time.perf_counter() - t_begin) < 2.0 * ms / 1e3 + 1.0:
                break  # enough steps, and the limit is near: stop short of the extra ones
        timed = steps_seen["timed"]
        record.update(
            ms=round(statistics.median(timed), 4),
            ms_min=round(min(timed), 4),
            ms_mean=round(statistics.fmean(timed), 4),
            ms_p20=round(_quantile(timed, 0.2), 4),
            ms_p80=round(_quantile(timed, 0.8), 4),
            wall_ms=round(statistics.median(walls), 4),
            steps=len(timed),
            warmup=len(steps_seen["warmup"]),
        )
        if device.type == "cuda" and graphed:
            # A graph's memory is its private pool, reserved at capture and reused by every replay; the
            # caching allocator counts it as allocated only during capture, so the footprint is what is reserved.
            record["peak_gib"] = round(_gib(torch.cuda.max_memory_reserved(device)), 4)
            record["memory_metric"] = "cuda.max_memory_reserved after empty_cache (graph pool included)"
        elif device.type == "cuda":
            record["peak_gib"] = round(_gib(torch.cuda.max_memory_allocated(device)), 4)
            record["memory_metric"] = "cuda.max_memory_allocated"
        else:
            record["peak_gib"] = round(_peak_rss_gib(), 4)
            record["memory_metric"] = "cpu max RSS"
        record["phase"] = "done"
    except BenchmarkTimeout as err:
        record.update(status="timeout", message=str(err))
    except BaseException as err:  # noqa: BLE001 - every failure is a result
        record.update(status="oom" if _is_oom(err) else "error", message=_describe(err))
        if device.type == "cuda":
            with contextlib.suppress(Exception):
                record["peak_gib_at_failure"] = round(_gib(torch.cuda.max_memory_allocated(device)), 4)
    if record["status"] != "ok":
        record["steps_seen_ms"] = {k: [round(v, 3) for v in vals] for k, vals in steps_seen.items() if vals}
    record["total_s"] = round(time.perf_counter() - t_begin, 3)
    return record


def _quantile(values, q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _describe(err: BaseException) -> str:
    """``Type: message`` (first 600 characters) plus the innermost frame, for the record."""
    text = f"{type(err).__name__}: {str(err).strip()}"
    if len(text) > 600:
        text = text[:600] + " …"
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        last = frames[-1]
        where = os.path.relpath(last.filename) if last.filename.startswith(os.getcwd()) else last.filename
        text += f" [at {where}:{last.lineno}]"
    return text


def noop() -> None:
    """Process target that does nothing: starting it brings the fork server up before any timing."""


def quiet_warnings() -> None:
    """Silences the peers' per-run notices that say nothing about this benchmark."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


def child_main(conn, cfg: Dict, limit_s: float) -> None:
    """Process target: runs `run_config`, streams progress, sends the record, exits."""
    quiet_warnings()

    def progress(info):
        with contextlib.suppress(Exception):
            conn.send(("progress", info))

    try:
        record = run_config(cfg, limit_s, progress)
    except BaseException as err:  # noqa: BLE001 - run_config catches everything; belt and braces
        record = {k: cfg.get(k) for k in ("workload", "B", "T", "dtype", "mode")}
        record.update(status="error", message=_describe(err))
    with contextlib.suppress(Exception):
        conn.send(("result", record))
        conn.close()
