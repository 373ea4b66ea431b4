"""``FSDP2Wrapper``: shards a model with FSDP2 (``fully_shard``) the way FlashNorm's ``_fsdp`` modes need.

Units are the model's repeated *blocks* (e.g. GPT-2's ``GPT2Block``s) and the root, which keeps the
remaining layers (embeddings, final norm, head). One all-gather per block in the forward and one in each
backward pass, as in ordinary FSDP training; FlashNorm's hooks sit on the layers inside the units.

Opacus's ``FSDP2Wrapper`` makes every layer with parameters a unit of its own: one collective per layer,
and a unit whose own output gradient FlashNorm would capture before FSDP has all-gathered its parameters.

Also the shard geometry FlashNorm's FSDP code shares: which rows of a full tensor a rank owns.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional, Tuple, Type

import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..norms.registry import trainable_own_parameters

__all__ = ["FSDP2Wrapper", "transformer_block_types"]


class RowShard(NamedTuple):
    """FSDP2's default layout of a parameter θ with n₀ = θ.shape[0] rows over W ranks (1-D mesh, ``Shard(0)``):
    ``torch.chunk`` semantics, rank r owns rows [r·rows, min((r+1)·rows, n₀)), rows = ⌈n₀/W⌉."""

    rank: int
    world: int
    rows: int  # rows per (padded) shard

    def local_rows(self, n0: int) -> int:
        """Rows this rank holds: between 0 and ``rows``."""
        return max(0, min(self.rows, n0 - self.rank * self.rows))


def row_shard(p: torch.Tensor) -> Optional[RowShard]:
    """The `RowShard` of ``p`` when it is a ``DTensor`` laid out as FSDP2's default; else ``None``."""
    if not isinstance(p, DTensor) or p.dim() == 0 or p.device_mesh.ndim != 1 or p.placements[0] != Shard(0):
        return None
    world = p.device_mesh.size()
    return RowShard(p.device_mesh.get_local_rank(), world, math.ceil(p.shape[0] / world))


def owned_part(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The elements of ``full`` ([*like.shape], the same on every rank) that this rank's shard of ``like``
    holds, as a local tensor (a view for FSDP2's default layout; no communication in any case)."""
    shard = row_shard(like)
    if shard is not None:
        return full.narrow(0, min(shard.rank * shard.rows, full.shape[0]), shard.local_rows(full.shape[0]))
    mesh = like.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()


def transformer_block_types(model: nn.Module) -> Tuple[Type[nn.Module], ...]:
    """Types of the modules held in the model's ``nn.ModuleList``s that hold no parameter directly.

    For HF GPT-2 that is ``(GPT2Block,)``; for a model without a ``ModuleList``, ``()``.
    """
    found = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                if not trainable_own_parameters(block) and type(block) not in found:
                    found.append(type(block))
    return tuple(found)


def FSDP2Wrapper(  # noqa: N802 - Opacus's name
    model: nn.Module,
    *,
    mp_policy: Optional[MixedPrecisionPolicy] = None,
    block_types: Optional[Iterable[Type[nn.Module]]] = None,
    reshard_after_forward: bool = True,
    **fully_shard_kwargs,
) -> nn.Module:
    """Applies ``fully_shard`` to every block of ``model``, then to ``model``; returns ``model``.

    Call it on every rank, after moving the model to its device and before creating the optimizer.

    Args:
        model: the model; its parameters become ``DTensor``s sharded over the ranks (dim 0).
        mp_policy: FSDP2's ``MixedPrecisionPolicy`` for every unit, e.g.
            ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`` (bf16
            compute, fp32 reduction, fp32 sharded parameters and optimizer; FlashNorm's norms are fp32).
        block_types: module types to shard as units; default `transformer_block_types`.
        reshard_after_forward: free each block's gathered parameters after its forward (gather again in
            backward), FSDP2's memory-saving default. The root is never resharded after forward.
        **fully_shard_kwargs: passed to every ``fully_shard`` call (e.g. ``mesh``).

    Raises:
        ValueError: a block type holds trainable parameters directly (FlashNorm's hooks must sit
            inside a unit, not on it).
    """
    types = tuple(block_types) if block_types is not None else transformer_block_types(model)
    mp_policy = mp_policy or MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if m is not model and isinstance(m, types)]
    for block in blocks:
        if trainable_own_parameters(block):
            raise ValueError(
                f"{type(block).__name__} holds parameters directly and cannot be an FSDP unit for FlashNorm; "
                "give block_types that contain the layers (e.g. a transformer block), not the layers."
            )
    for block in reversed(blocks):  # inner blocks before the blocks containing them
        fully_shard(block, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward, **fully_shard_kwargs)
    fully_shard(model, mp_policy=mp_policy, reshard_after_forward=False, **fully_shard_kwargs)
    return model
