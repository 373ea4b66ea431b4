"""Grad-sample modules for a model wrapped with FSDP2 (``fully_shard``): ``ghost_fsdp``, ``flash_fsdp``,
``flash_fuse_fsdp``.

Layout. FSDP2 shards every parameter θ (a ``DTensor``, ``Shard(0)`` over the W data-parallel ranks) and
all-gathers the parameters of one *unit* (a module given to ``fully_shard``) around its forward and its
backward. FlashNorm's hooks sit on the layers *inside* the units, so they run while the unit's parameters
are unsharded: X is kept in the forward, and the output gradient G reaches a layer's gradient tap after the
unit's pre-backward all-gather. A layer that holds parameters must therefore not be a unit itself; shard
blocks (`flashnorm.utils.fsdp_utils.FSDP2Wrapper` does).

Norms. Rank r computes ‖∇ℓ_b‖ for its own samples b ∈ ℬ_r from its own X, G. The norm pass
(``torch.autograd.grad`` to the gradient taps) computes no parameter gradient, so FSDP's reduce-scatter moves
nothing; norms of different ranks are never combined.

Clipped gradients. Every rank ends with the shard it owns of FSDP's *average* of the local clipped sums,

    p.grad = shard_r( (1/W) Σ_r S_r ),      S_r = Σ_{b∈ℬ_r} c_b ∇ℓ_b,

which the FSDP DP optimizer (`flashnorm.optimizers.fsdp.FSDPOptimizerFastGradientClipping`)
noises and rescales. Two passes: the second backward of Σ_b c_b ℓ_b goes through FSDP's own
reduce-scatter, in FSDP's ``reduce_dtype``. One pass: the gradients are assembled after the backward, so
FSDP's hooks never see them; the layers' full-shape gradients [*θ.shape] are assembled in order, packed
into buckets of ~32M elements and reduce-scattered (SUM, then ÷W) into the parameter shards, one bucket's
collective overlapping the next one's assembly, in the sharded parameter's dtype (fp32 under a bf16
``MixedPrecisionPolicy``). Extra memory: about two buckets. Every rank reduces every trainable parameter
in the same order, with zeros where its batch gave nothing (e.g. an empty Poisson batch).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Partial

from ..norms.registry import trainable_own_parameters
from ..utils.fsdp_utils import row_shard
from .capture import HookedLayer
from .module import FlashNormGradSampleModule
from .writers import AssembleFromKept, KeptInputs, KeptPerSample, SecondBackward


def _unsharded_class(module: nn.Module) -> type:
    """The module's own class (``fully_shard`` swaps in a generated ``FSDP<Name>`` subclass)."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def check_fsdp_layout(module: nn.Module) -> None:
    """Raises unless ``module`` is an FSDP2 root over all ranks whose units hold no parameters directly.

    Raises:
        ValueError: ``module`` is not wrapped with ``fully_shard``.
        NotImplementedError: a layer holding trainable parameters is an FSDP2 unit itself, or a parameter
            is sharded over a mesh that is not 1-D over all ranks (HSDP, tensor parallelism).
    """
    if not isinstance(module, FSDPModule):
        raise ValueError(
            f"The FSDP modes need a module wrapped with FSDP2, got {type(module).__name__}. Fix: "
            "model = flashnorm.utils.fsdp_utils.FSDP2Wrapper(model) before creating the optimizer, or use the "
            "mode without '_fsdp' on one device or with DDP."
        )
    world = dist.get_world_size()
    for name, p in module.named_parameters():
        if isinstance(p, DTensor) and (p.device_mesh.ndim != 1 or p.device_mesh.size() != world):
            raise NotImplementedError(
                f"Parameter '{name}' is sharded over a {p.device_mesh.ndim}-D mesh of {p.device_mesh.size()} ranks; "
                f"the FSDP modes support FSDP2 over one 1-D mesh of all {world} ranks (no HSDP or tensor "
                "parallelism yet): every element's noise is drawn by the one rank that holds it."
            )
    for name, sub in module.named_modules():
        if isinstance(sub, FSDPModule) and trainable_own_parameters(sub):
            raise NotImplementedError(
                f"'{name or '<root>'}' ({_unsharded_class(sub).__name__}) holds parameters and is an FSDP2 unit "
                "itself. FlashNorm's hooks must sit inside a unit, whose backward all-gather runs before a layer "
                "receives its output gradient. Fix: shard blocks that contain the layers, not the layers: "
                "flashnorm.utils.fsdp_utils.FSDP2Wrapper(model) shards each transformer block and the root."
            )


@contextmanager
def _data_less_parameters(module: nn.Module):
    """Shows a layer's rule plain full-shape parameters instead of FSDP's sharded ``DTensor`` ones.

    After the backward pass FSDP has resharded the layer. Its rule's ``clipped_grads`` reads only the
    parameters' shape, dtype, device and ``requires_grad`` (a clipped gradient depends on X, G and c, not
    on θ), so each ``DTensor`` parameter held directly by ``module`` is replaced, for the duration, by a
    NaN-valued stride-0 stand-in of the full shape (one element of memory; a rule that read values would
    produce NaN, never a silently wrong gradient). Yields ``{stand-in: sharded parameter}``.
    """
    saved = {name: p for name, p in module._parameters.items() if isinstance(p, DTensor)}
    owner = {}
    for name, p in saved.items():
        value = torch.full((), float("nan"), dtype=p.dtype, device=p.device).expand(p.shape)
        stand_in = nn.Parameter(value, requires_grad=p.requires_grad)
        module._parameters[name] = stand_in
        owner[stand_in] = p
    try:
        yield owner
    finally:
        module._parameters.update(saved)


def _param_groups(unit: FSDPModule) -> list:
    """The FSDP2 parameter groups of one unit (torch ≥ 2.12 keeps a list, earlier versions one group or None)."""
    state = unit._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [state._fsdp_param_group] if getattr(state, "_fsdp_param_group", None) is not None else []
    return list(groups)


class FSDPGradSampleModule(FlashNormGradSampleModule):
    """The grad-sample module of the ``_fsdp`` modes: checks the FSDP2 layout at construction and maps sharded
    parameters to FSDP2's unsharded ones (the aliases' counterparts: `aliases`).

    ``p.grad`` ends as the owned shard of (1/W) Σ_r S_r (FSDP's average), whichever the writer: the second backward
    goes through FSDP's own reduce-scatter; `ReduceScatterAssembly` reduce-scatters what it assembles.
    """

    #: The rules see FSDP's unsharded parameters, not the sharded ones packed buffers would be laid out for;
    #: per-sample gradients stay per layer (one pass: they go to the reducer one by one).
    packs_per_sample_grads = False
    #: Their per-sample norms are keyed by the unsharded parameters too: no ``p._norm_sample`` of the sharded ones.
    splits_norms = False

    def __init__(self, m: nn.Module, **kwargs):
        check_fsdp_layout(m)
        self._fsdp_params = {
            id(fsdp_param.sharded_param): fsdp_param
            for unit in m.modules() if isinstance(unit, FSDPModule)
            for group in _param_groups(unit) for fsdp_param in group.fsdp_params
        }  # fmt: skip
        super().__init__(m, **kwargs)

    def _parameter_counterpart(self, p: nn.Parameter) -> Optional[nn.Parameter]:
        """FSDP2's unsharded parameter of sharded ``p`` (what its registrations hold while its unit runs), once the
        first all-gather has made it."""
        fsdp_param = self._fsdp_params.get(id(p))
        return getattr(fsdp_param, "_unsharded_param", None) if fsdp_param is not None else None


class ReduceScatterAssembly(AssembleFromKept):
    """One pass (``flash_fuse_fsdp``): the assembled clipped gradients reduce-scattered bucket by bucket.

    ``p.grad`` ends as the owned shard of (1/W) Σ_r S_r, exactly what FSDP's reduce-scatter of an ordinary backward
    would leave, so the FSDP optimizer treats both kinds of mode alike.
    """

    assembles_groups = False  # each layer's gradients are reduce-scattered with its own unit's

    def __init__(self):
        # Sharded parameters by name, per layer: per-sample gradients kept during the backward are keyed by FSDP's
        # unsharded parameters, which are re-keyed by name onto these.
        self._sharded: Dict[HookedLayer, Dict[str, nn.Parameter]] = {}

    def bind(self, layers) -> None:
        self._sharded = {
            layer: {n: p for n, p in layer.module.named_parameters() if any(p is q for q in layer.params)}
            for layer in layers
        }

    def keep(self, kept_by_layer, layer, kept):
        if isinstance(kept, KeptPerSample):
            name_of = {p: n for n, p in layer.module.named_parameters()}  # FSDP's unsharded parameters now
            sharded = self._sharded[layer]
            kept = KeptPerSample({sharded[name_of[p]]: gs for p, gs in kept.grads.items()})
        kept_by_layer[layer] = kept

    def write(self, step, loss_per_sample, coef, backend):
        reducer = _ClippedGradReducer()
        kept_by_layer, step.kept = step.kept, {}
        for layer in step.layers:
            kept = kept_by_layer.get(layer)
            grads = {} if kept is None else self._clipped_grads(layer, kept, coef, backend)
            for p in layer.params:
                reducer.add(p, grads.get(p))
        reducer.close()

    @staticmethod
    def _clipped_grads(layer: HookedLayer, kept, coef: torch.Tensor, backend: str) -> Dict[nn.Parameter, torch.Tensor]:
        """Σ_{b∈ℬ_r} c_b ∇_θ ℓ_b of the layer's parameters, full shape, keyed by the sharded parameters."""
        if not isinstance(kept, KeptInputs):
            return kept.clipped_grads(layer.rule, layer.module, coef, backend=backend)
        with _data_less_parameters(layer.module) as owner:
            grads = kept.clipped_grads(layer.rule, layer.module, coef, backend=backend)
        return {owner.get(p, p): grad for p, grad in grads.items()}


class FSDPGradSampleModuleFastGradientClipping(FSDPGradSampleModule):
    """Two passes (``ghost_fsdp``, ``flash_fsdp``): the second goes through FSDP's reduce-scatter."""

    writer_class = SecondBackward


class FSDPGradSampleModuleFastGradientClippingFuse(FSDPGradSampleModule):
    """One pass (``flash_fuse_fsdp``): the assembled clipped gradients reduce-scattered (`ReduceScatterAssembly`)."""

    writer_class = ReduceScatterAssembly


#: Clipped gradients are reduce-scattered in buckets of about this many (padded, full-shape) elements.
REDUCE_BUCKET_ELEMENTS = 1 << 25


class _ClippedGradReducer:
    """Adds shard_r((1/W) Σ_r G_r) to ``p.grad`` for full-shape local gradients G_r, bucket by bucket.

    Call `add` for every trainable parameter in the same order on every rank (it is collective),
    then `close`. For FSDP2's default layout (`row_shard`),
    consecutive parameters of one dtype are packed into a send buffer [W, L] whose row s holds the
    (zero-padded) rows that rank s owns of each; one SUM ``reduce_scatter_tensor`` over the mesh's group
    leaves each rank its [L], divided by W. A bucket's collective runs while the next bucket is
    assembled. Other layouts (FSDP2 sharding another dim) use DTensor's ``Partial`` → placements
    redistribution, one parameter at a time.
    """

    def __init__(self):
        self._pending = []  # (p, G_r or None, RowShard)
        self._numel = 0
        self._in_flight = None

    def add(self, p: nn.Parameter, grad: Optional[torch.Tensor]) -> None:
        shard = row_shard(p)
        if shard is None:
            self._launch()
            _redistribute_into(p, grad)
            return
        numel = shard.world * shard.rows * (p.numel() // p.shape[0])
        if self._pending and (
            p.dtype != self._pending[0][0].dtype
            or p.device_mesh != self._pending[0][0].device_mesh
            or self._numel + numel > REDUCE_BUCKET_ELEMENTS
        ):
            self._launch()
        self._pending.append((p, grad, shard))
        self._numel += numel

    def close(self) -> None:
        self._launch()
        self._complete()

    def _launch(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._numel = self._pending, [], 0
        first, _, layout = pending[0]
        widths = [s.rows * (p.numel() // p.shape[0]) for p, _, s in pending]  # elements per rank, per parameter
        send = torch.zeros(layout.world, sum(widths), dtype=first.dtype, device=first.device)
        for (p, grad, s), dst in zip(pending, send.split(widths, dim=1)):
            if grad is None:
                continue
            rows = grad.reshape(p.shape[0], -1)
            full, rest = divmod(p.shape[0], s.rows)
            dst[:full].copy_(rows[: full * s.rows].reshape(full, -1))
            if rest:
                dst[full, : rest * rows.shape[1]].copy_(rows[full * s.rows :].reshape(-1))
        recv = torch.empty(sum(widths), dtype=first.dtype, device=first.device)
        work = dist.reduce_scatter_tensor(recv, send.view(-1), group=first.device_mesh.get_group(), async_op=True)
        self._complete()
        self._in_flight = (work, send, recv, [(p, s) for p, _, s in pending], widths)  # the G_r can go

    def _complete(self) -> None:
        if self._in_flight is None:
            return
        work, _send, recv, params, widths = self._in_flight
        self._in_flight = None
        work.wait()
        recv.div_(params[0][1].world)
        for (p, s), part in zip(params, recv.split(widths)):
            local = part.view(s.rows, *p.shape[1:])[: s.local_rows(p.shape[0])]
            if p.grad is None:
                p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                            run_check=False)
            else:
                p.grad.to_local().add_(local)


def _redistribute_into(p: nn.Parameter, grad: Optional[torch.Tensor]) -> None:
    """Adds shard_r((1/W) Σ_r grad_r) to ``p.grad`` through DTensor (any layout); collective."""
    mesh = p.device_mesh
    if grad is None:
        local = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    else:
        local = grad.to(p.dtype) / mesh.size()
    shard = DTensor.from_local(local, mesh, [Partial()] * mesh.ndim, run_check=False).redistribute(mesh, p.placements)
    if p.grad is None:
        p.grad = shard
    else:
        p.grad.add_(shard)
