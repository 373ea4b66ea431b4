"""Samples stay independent: layers that mix samples or write state from the batch are refused, and a probe.

DP-SGD bounds each sample's influence through its own loss ℓ_b. That holds only while ℓ_b depends on sample b
alone and the forward changes nothing but activations. Two checks keep it:

* **Refused layers** (`LayerChecks`), found by a walk of every module (parameter-free ones included, which
  the hooked-layer discovery does not see), checked when the module is wrapped and again at the start of every
  forward (a handful of attribute reads: the candidates are listed once):

  - ``_BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the lazy ones) in training mode, whatever its trainable
    state (``affine=False`` or frozen too): its batch statistics mix samples and its running statistics are written
    from the batch. In eval mode with running statistics it is a fixed affine map per sample and is accepted;
    ``track_running_stats=False`` uses batch statistics in eval mode too and is always refused.
    Fix: GroupNorm (``opacus.validators.ModuleValidator.fix(model)``), or keep the layer in eval mode.
  - ``_InstanceNorm`` with ``track_running_stats=True`` in training mode: each sample is normalised on its own, but
    the running statistics (part of the model's state, released without noise) are written from the batch.
    Fix: ``track_running_stats=False``, or keep the layer in eval mode.
  - ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``max_norm``: the forward renormalises the looked-up rows of the
    weight in place, in eval mode too, writing which ids were in the batch into the parameters without noise.
    Fix: ``max_norm=None``.
  - ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``scale_grad_by_freq=True`` and a trainable weight: the gradient
    is divided by each id's frequency in the whole batch, so it mixes samples. Fix: ``scale_grad_by_freq=False``.

* **The sample-independence probe** (`IndependenceProbe`), run once, at the first capturing forward with
  B ≥ 2: one extra forward of the model on a copy of the batch whose row 0 is replaced by another row (every
  tensor argument with the batch dimension, so the copy stays in the inputs' domain: token ids stay ids, masks stay
  masks), with the random-number state restored before the real forward so that dropout draws the same masks in
  both. The rows other than 0 of every floating-point output must agree (to the output dtype's rounding); otherwise
  the model mixes samples and the step is refused before any gradient exists. It also refuses a forward that writes
  a parameter in place or a buffer (compared by version counters), naming them, unless the buffer is registered
  as harmless (`register_harmless_buffer`).

  Cost: one forward of the first batch (grad mode as the real one, so the same kernels run; its graph is freed
  before the real forward: the peak memory is that of one training forward plus a copy of the outputs), once per
  wrapped module. What it cannot see: mixing that this one perturbation leaves unchanged (an order statistic over
  the batch that rows 0 and j do not reach, mixing that starts only in later steps or on other batch sizes,
  data-dependent branches the first batch does not take); mixing in the loss (outside the model); state written
  outside the forward. Under FSDP2 it is skipped (the forward all-gathers; a per-rank extra forward could not keep
  the ranks' collectives in step); under DDP it runs the local module (no collective).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Set, Tuple, Type

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


class SampleMixingError(ValueError):
    """The model mixes samples or writes its state from the batch: DP-SGD's per-sample bound would not hold."""


#: (module class, buffer name) pairs whose writes in a training forward are documented as harmless.
_HARMLESS_BUFFERS: Set[Tuple[Type[nn.Module], str]] = set()


def register_harmless_buffer(module_class: Type[nn.Module], name: str) -> None:
    """Declares that a training forward of ``module_class`` may write its buffer ``name`` without revealing the
    batch (e.g. a cache that depends on the sequence length only); the probe then ignores its writes."""
    _HARMLESS_BUFFERS.add((module_class, name))


def _refusal(module: nn.Module) -> Optional[Tuple[str, str]]:
    """(why, fix) when ``module`` as it is now mixes samples or writes its state from the batch, else ``None``."""
    if isinstance(module, _BatchNorm):
        if not module.track_running_stats or module.running_mean is None:
            return ("uses batch statistics in every mode (track_running_stats=False), mixing samples",
                    "replace it with GroupNorm (opacus.validators.ModuleValidator.fix(model))")
        if module.training:
            return ("is in training mode: its batch statistics mix samples and its running statistics are written "
                    "from the batch, whatever its trainable state (affine=False or frozen too)",
                    "replace it with GroupNorm (opacus.validators.ModuleValidator.fix(model)), or keep it in eval "
                    "mode (call .eval() on it after model.train())")
    elif isinstance(module, _InstanceNorm):
        if module.training and module.track_running_stats:
            return ("is in training mode with track_running_stats=True: its running statistics are written from "
                    "the batch", "pass track_running_stats=False, or keep it in eval mode")
    elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        if module.max_norm is not None:
            return (f"has max_norm={module.max_norm}: its forward renormalises the looked-up rows of the weight in "
                    "place (in eval mode too), writing which ids were in the batch into the parameters",
                    "pass max_norm=None")
        if module.scale_grad_by_freq and module.weight.requires_grad:
            return ("has scale_grad_by_freq=True: its gradient divides by each id's frequency in the whole batch, "
                    "so a sample's gradient depends on the other samples", "pass scale_grad_by_freq=False")
    return None


_CANDIDATES = (_BatchNorm, _InstanceNorm, nn.Embedding, nn.EmbeddingBag)


class LayerChecks:
    """The modules of a wrapped model that could mix samples or write state from the batch, listed once (every
    module, parameter-free ones too); `check` raises for any that does so as it is now."""

    def __init__(self, module: nn.Module):
        self.candidates: List[Tuple[str, nn.Module]] = [
            (name or "<root>", m) for name, m in module.named_modules() if isinstance(m, _CANDIDATES)
        ]

    def check(self) -> None:
        """Raises `SampleMixingError` naming the first refused layer (its path, why, the fix)."""
        for name, m in self.candidates:
            found = _refusal(m)
            if found is not None:
                why, fix = found
                raise SampleMixingError(
                    f"Layer '{name}' ({type(m).__name__}) {why}; DP-SGD needs samples to stay independent. "
                    f"Fix: {fix}."
                )


# -- the probe ---------------------------------------------------------------------------------------------------
def _map(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _tensors(obj: Any, path: str = "output") -> Iterable[Tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in a nested output (tuples, lists, dicts, ``ModelOutput``s)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            yield from _tensors(o, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k!r}]")


def _rng_devices(module: nn.Module, args, kwargs) -> List[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    devices = {t.device.index for _, t in _tensors((args, kwargs)) if t.is_cuda}
    devices |= {p.device.index for p in module.parameters() if p.is_cuda}
    return sorted(d if d is not None else torch.cuda.current_device() for d in devices)


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)


class IndependenceProbe:
    """One probe of a batch (see the module docstring): `perturbed_forward` before the real forward, whose
    output `compare` then checks."""

    def __init__(self, module: nn.Module, batch_dim: int, batch_size: int):
        self.module, self.batch_dim, self.batch_size = module, batch_dim, batch_size
        self.perturbed: Optional[List[Tuple[str, torch.Tensor]]] = None
        self.row: Optional[int] = None

    def _source_row(self, args, kwargs) -> Optional[int]:
        """A row j whose inputs differ from row 0's (``None`` when all rows are equal: nothing to perturb)."""
        batched = [t for _, t in _tensors((args, kwargs)) if self._batched(t)]
        for j in range(1, self.batch_size):
            if any(not torch.equal(t.select(self.batch_dim, 0), t.select(self.batch_dim, j)) for t in batched):
                return j
        return None

    def _batched(self, t: torch.Tensor) -> bool:
        return t.dim() > self.batch_dim and t.shape[self.batch_dim] == self.batch_size

    def _perturb(self, t: torch.Tensor) -> torch.Tensor:
        if not self._batched(t):
            return t
        copy = t.detach().clone()
        copy.select(self.batch_dim, 0).copy_(t.detach().select(self.batch_dim, self.row))
        return copy.requires_grad_(t.requires_grad) if t.is_leaf and t.requires_grad else copy

    @classmethod
    def start(cls, module: nn.Module, batch_dim: int, batch_size: Optional[int], args, kwargs,
              leading_batch_size: Callable) -> Optional["IndependenceProbe"]:
        """A probe whose `perturbed_forward` ran on this batch, or ``None`` where it does not apply: fewer than
        two samples, rows all equal, or a CUDA graph being captured. ``batch_size`` is the first positional input's
        (``None``: read from the keyword tensors with ``leading_batch_size``, for Hugging Face's ``model(**batch)``)."""
        if batch_size is None:
            batch_size = leading_batch_size(tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
        if batch_size is None or batch_size < 2:
            return None
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None
        probe = cls(module, batch_dim, batch_size)
        return probe if probe.perturbed_forward(args, kwargs) else None

    def perturbed_forward(self, args, kwargs) -> bool:
        """Runs the module on the batch with row 0 replaced by row j, then restores the random-number state so that
        the real forward draws what the probe drew. ``False`` when there was nothing to perturb.

        Raises:
            SampleMixingError: the forward wrote a parameter in place, or a buffer not registered as harmless.
        """
        self.row = self._source_row(args, kwargs)
        if self.row is None:
            return False
        p_args, p_kwargs = _map(args, self._perturb), _map(kwargs, self._perturb)
        devices = _rng_devices(self.module, args, kwargs)
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
        named = [("parameter", n, self.module, p) for n, p in self.module.named_parameters()]
        named += [("buffer", n, self.module, b) for n, b in self.module.named_buffers()]
        versions = [t._version for *_, t in named]
        try:
            out = self.module(*p_args, **p_kwargs)
            self.perturbed = [(path, t.detach()) for path, t in _tensors(out)]
            del out
        finally:
            torch.set_rng_state(cpu_state)
            for d, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, d)
        written = [(kind, n) for (kind, n, _, t), v in zip(named, versions) if t._version != v]
        written = [(kind, n) for kind, n in written if not (kind == "buffer" and self._harmless(n))]
        if written:
            kind, name = written[0]
            what = ("writes parameter '{}' in place: which samples were in the batch reaches the parameters without "
                    "noise" if kind == "parameter" else "writes buffer '{}' from the batch")
            raise SampleMixingError(
                f"The model's training forward {what.format(name)} (found by FlashNorm's sample-independence probe"
                f"{'; also ' + ', '.join(repr(n) for _, n in written[1:]) if len(written) > 1 else ''}). Fix: remove "
                "the write (e.g. max_norm=None, a BatchNorm → GroupNorm), keep that layer in eval mode, or, for a "
                "buffer that reveals nothing about the batch, flashnorm.grad_sample.independence."
                "register_harmless_buffer(cls, name)."
            )
        return True

    @staticmethod
    def _difference(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
        """``None`` when ``a`` and ``b`` agree (to their dtype's rounding), else their largest difference."""
        if torch.equal(a, b):
            return None
        if a.is_floating_point() or a.is_complex():
            tol = _tolerance(a.dtype)
            scale = float(a.abs().nan_to_num(0, 0, 0).max()) if a.numel() else 0.0
            if torch.allclose(a, b, rtol=tol, atol=tol * max(scale, 1e-30), equal_nan=True):
                return None
            return float((a.double() - b.double()).abs().nan_to_num(float("inf")).max())
        return float("nan")

    def _harmless(self, name: str) -> bool:
        owner_path, _, buffer = name.rpartition(".")
        owner = self.module.get_submodule(owner_path) if owner_path else self.module
        return any(isinstance(owner, cls) and buffer == b for cls, b in _HARMLESS_BUFFERS)

    def compare(self, output) -> None:
        """Raises `SampleMixingError` when an output changed outside the slice of sample 0. An output's batch
        dimension is the inputs' (``batch_dim``) or another of size B (a sequence-first model may return [B, ...]):
        the output is independent when, along one of them, every row but 0 is as the probe found it."""
        real = [(path, t.detach()) for path, t in _tensors(output)]
        if self.perturbed is None or len(real) != len(self.perturbed):
            return
        for (path, ref), (_, probed) in zip(real, self.perturbed):
            if ref.shape != probed.shape or ref.dtype != probed.dtype or torch.equal(ref, probed):
                continue
            dims = [d for d in dict.fromkeys((self.batch_dim, 0, *range(ref.dim()))) if d < ref.dim()
                    and ref.shape[d] == self.batch_size]
            diffs = [self._difference(ref.narrow(d, 1, self.batch_size - 1), probed.narrow(d, 1, self.batch_size - 1))
                     for d in dims]
            if not dims or any(diff is None for diff in diffs):
                continue
            diff = diffs[0]
            raise SampleMixingError(
                f"The model mixes samples: changing sample 0 of the batch (to a copy of sample {self.row}) changed "
                f"the other samples' {path} (by up to {diff:.3g}), found by FlashNorm's sample-independence probe. "
                "A layer computes across the batch (batch statistics, x - x.mean(0), attention or a softmax over "
                "the batch dimension, a wrong batch_first); DP-SGD needs each sample's output to depend on that "
                "sample alone. Fix: replace that computation (BatchNorm → GroupNorm: "
                "opacus.validators.ModuleValidator.fix(model)), or check batch_first."
            )
