"""Multi-tensor passes over a list of gradients (the DP tail): one launch per list, not one per tensor.

For tensors g_1 … g_n of one dtype on one device, ν = Σ_i numel(g_i) elements in all, and
o_i = Σ_{j<i} numel(g_j) the offset of g_i in their concatenation:

    squared_norm(gs)            → s = Σ_i ‖g_i‖²                          float32 [1] (float64 for float64)
    scale_(gs, c)                 g_i ← c · g_i                              c: one element on the device (no host sync)
    add_then_scale_(gs, z, a)     g_i ← (g_i + z[o_i : o_i + numel(g_i)]) · a     z: [ν] flat, a: a float

(The B = 1 step clips its one gradient, the sample's, by ``scale_`` with the coefficient that
`flashnorm.norms.rounding.clipping_coef` computes from ``squared_norm``.)

A model's gradients are ~150 tensors. torch's foreach ops launch few kernels, but build one tensor per
parameter on the host for every result (the norms) or argument (views of a flat noise buffer): at
B = 1 that host time exceeds the GPU work of the whole clipping tail. Here a list is described by a
*work table* — one row per chunk of at most ``CHUNK`` elements: (tensor, start, length, offset in the
list) — built once per list of sizes and cached on the device, plus the tensors' addresses, uploaded
again only when they changed since the last launch over that list; a launch runs one program per row.

Memory-bound passes: ``squared_norm`` reads ν elements (float32 partial sums per chunk, then one sum);
``scale_`` reads and writes ν (every program reads c on the device);
``add_then_scale_`` reads 2ν and writes ν, where an add then a multiply would read 3ν and write 2ν.
Arithmetic in float32 whatever the storage dtype, rounded once on store.

The Triton path needs every tensor contiguous and is not used while a CUDA graph is being captured
(the table upload is a host-to-device copy): the PyTorch references (``torch._foreach_*``) serve there
under ``backend="auto"`` (a forced ``"triton"`` raises), on other devices, for float64 and with
``backend="torch"``.

Layout of this file: the Triton kernels, the work table, the launch wrappers, the PyTorch references,
the dispatchers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .accumulation import accumulation_dtype, accumulation_dtype_of
from .backend import INTERPRET, resolve_backend, use_triton
from .triton_support import tl, triton


# -- Triton kernels: program r handles row r of the work table ------------------------------------------------------
@triton.jit
def _chunk(table_ptr, address_ptr, row, DTYPE: tl.constexpr):
    """(pointer to the first element, length, offset in the list) of the chunk of table row ``row``, where
    table[row] = (tensor index i, start in g_i, length, offset) and address[i] = g_i's address."""
    tensor = tl.load(table_ptr + 4 * row)
    start = tl.load(table_ptr + 4 * row + 1)
    base = tl.load(address_ptr + tensor).to(tl.pointer_type(DTYPE)) + start
    return base, tl.load(table_ptr + 4 * row + 2), tl.load(table_ptr + 4 * row + 3)


@triton.jit
def _squared_norm_kernel(table_ptr, address_ptr, partial_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """partial[r] = Σ x² over the chunk of row r, in float32."""
    row = tl.program_id(0)
    base, length, _ = _chunk(table_ptr, address_ptr, row, DTYPE)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < length, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _scale_kernel(table_ptr, address_ptr, coef_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """x ← c · x over the chunk of row r, c = coef[0] read on the device, in float32."""
    row = tl.program_id(0)
    base, length, _ = _chunk(table_ptr, address_ptr, row, DTYPE)
    c = tl.load(coef_ptr).to(tl.float32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < length
        x = tl.load(base + offs, mask=mask).to(tl.float32)
        tl.store(base + offs, (x * c).to(DTYPE), mask=mask)


@triton.jit
def _add_then_scale_kernel(table_ptr, address_ptr, z_ptr, alpha, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """x ← (x + z[offset + i]) · alpha over the chunk of row r (offset: the chunk's place in the list)."""
    row = tl.program_id(0)
    base, length, offset = _chunk(table_ptr, address_ptr, row, DTYPE)
    z_base = z_ptr + offset
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < length
        x = tl.load(base + offs, mask=mask).to(tl.float32)
        z = tl.load(z_base + offs, mask=mask).to(tl.float32)
        tl.store(base + offs, ((x + z) * alpha).to(DTYPE), mask=mask)


# -- the work table -----------------------------------------------------------------------------------------------
#: Elements per table row (one program); a program loops over its chunk in ``_block()`` steps.
CHUNK = 1 << 16

#: Tables kept, most recently used last: a training loop has a few gradient lists (all of them, then the
#: noise buckets), whose sizes never change.
TABLE_CACHE_SIZE = 64


class ListLayout:
    """The work table of one list of sizes, and the addresses last uploaded for it: (stream, addresses, device copy)."""

    __slots__ = ("table", "uploaded")

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.uploaded: Optional[Tuple[int, List[int], torch.Tensor]] = None


#: The cached `ListLayout` of each list of sizes, keyed by (device, dtype, numels), most recently used last.
#: Internal but stable for tools and tests (they count and reset it): read by `work_table` at every launch.
work_tables: "OrderedDict[Tuple, ListLayout]" = OrderedDict()


def _block() -> int:
    return CHUNK if INTERPRET else 2048


def work_table(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(table, addresses) on the tensors' device for one launch over ``tensors``.

    table: int64 [rows, 4], one row per chunk of ≤ ``CHUNK`` elements: (tensor index i, start in g_i, length,
    offset in the list); it depends on the sizes alone and is cached under (device, dtype, numels). Empty tensors
    contribute no row. addresses: int64 [n], g_i's address on the device. In a training loop the caching allocator
    usually hands the gradients the same blocks at every step: the device copy of the last addresses seen for this
    list on this stream is reused while they are unchanged (the kernels only read it, in stream order); new ones
    are uploaded without the host waiting (`upload_addresses`).
    """
    first = tensors[0]
    key = (first.device, first.dtype, tuple(t.numel() for t in tensors))
    layout = work_tables.get(key)
    if layout is None:
        rows: List[Tuple[int, int, int, int]] = []
        offset = 0
        for i, n in enumerate(key[2]):
            rows.extend((i, start, min(CHUNK, n - start), offset + start) for start in range(0, n, CHUNK))
            offset += n
        layout = work_tables[key] = ListLayout(torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(first.device))
        if len(work_tables) > TABLE_CACHE_SIZE:
            work_tables.popitem(last=False)
    else:
        work_tables.move_to_end(key)
    addresses = [t.data_ptr() for t in tensors]
    stream = torch.cuda.current_stream(first.device).cuda_stream if first.is_cuda else 0
    uploaded = layout.uploaded
    if uploaded is None or uploaded[0] != stream or uploaded[1] != addresses:
        uploaded = layout.uploaded = (stream, addresses, upload_addresses(addresses, first.device))
    return layout.table, uploaded[2]


#: Pinned host slots for the address arrays, per device, used in turn. A copy from pinned memory is queued
#: without the host waiting; from pageable memory the driver stages it and may wait for the previous staged
#: copy, which ties the host to the GPU's progress.
_STAGING_SLOTS = 64
_staging: Dict[torch.device, list] = {}


def upload_addresses(addresses: List[int], device: torch.device) -> torch.Tensor:
    """int64 [n] on ``device`` holding ``addresses``, copied asynchronously through a pinned slot; a slot is reused
    once its previous copy has run (its event), i.e. the host may run ``_STAGING_SLOTS`` copies ahead of the GPU.

    Internal but stable for tools and tests (they count the uploads): `work_table` calls it by this name."""
    host = torch.tensor(addresses, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    slots = _staging.setdefault(device, [0] + [None] * _STAGING_SLOTS)  # [next slot, (buffer, event) ...]
    i = slots[0] + 1
    slots[0] = i % _STAGING_SLOTS
    buffer, event = slots[i] or (None, None)
    if event is not None:
        event.synchronize()
    if buffer is None or buffer.numel() < host.numel():
        buffer = torch.empty(max(256, host.numel()), dtype=torch.int64, pin_memory=True)
    buffer[: host.numel()].copy_(host)
    out = buffer[: host.numel()].to(device, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    slots[i] = (buffer, event)
    return out


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


# -- launch wrappers (one dtype, one device, contiguous tensors) --------------------------------------------------
#: (table, addresses) of `work_table`, computed once when several passes run over the same list.
Launch = Tuple[torch.Tensor, torch.Tensor]


def squared_norm_triton(tensors: Sequence[torch.Tensor], launch: Optional[Launch] = None) -> torch.Tensor:
    """Triton Σ_i ‖g_i‖² → float32 [1]."""
    table, addresses = launch or work_table(tensors)
    partial = torch.empty(table.shape[0], dtype=torch.float32, device=tensors[0].device)
    if table.shape[0]:
        _squared_norm_kernel[(table.shape[0],)](table, addresses, partial, DTYPE=_tl_dtype(tensors[0].dtype),
                                                BLOCK=_block(), num_warps=8)
    return partial.sum(dim=0, keepdim=True)


def scale_triton_(tensors: Sequence[torch.Tensor], coef: torch.Tensor, launch: Optional[Launch] = None) -> None:
    """Triton g_i ← c · g_i in place, c = ``coef`` (one float32 element on the tensors' device), in float32."""
    table, addresses = launch or work_table(tensors)
    if table.shape[0]:
        _scale_kernel[(table.shape[0],)](table, addresses, coef.reshape(1), DTYPE=_tl_dtype(tensors[0].dtype),
                                         BLOCK=_block(), num_warps=8)


def add_then_scale_triton_(tensors: Sequence[torch.Tensor], z: torch.Tensor, alpha: float) -> None:
    """Triton g_i ← (g_i + z[o_i : o_i + numel(g_i)]) · alpha in place (z: contiguous [ν], the tensors' dtype)."""
    table, addresses = work_table(tensors)
    if table.shape[0]:
        _add_then_scale_kernel[(table.shape[0],)](table, addresses, z, float(alpha), DTYPE=_tl_dtype(tensors[0].dtype),
                                                  BLOCK=_block(), num_warps=8)


# -- PyTorch references ---------------------------------------------------------------------------------------------
def squared_norm_reference(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i ‖g_i‖² → [1], accumulated in float32 (float64 when any tensor is float64): one foreach norm."""
    acc = accumulation_dtype(*tensors)
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=acc)).square_().sum(dim=0, keepdim=True)


def scale_reference_(tensors: Sequence[torch.Tensor], coef: torch.Tensor) -> None:
    """g_i ← c · g_i in place, c = ``coef`` (one element on the tensors' device): one foreach multiplication by the
    0-d tensor (in float32 for float32 and 16-bit tensors when ``coef`` is float32)."""
    torch._foreach_mul_(list(tensors), coef.reshape(()))


def add_then_scale_reference_(tensors: Sequence[torch.Tensor], z: torch.Tensor, alpha: float) -> None:
    """g_i ← (g_i + z[o_i : o_i + numel(g_i)]) · alpha in place: views of z, one foreach add, one foreach multiply."""
    tensors = list(tensors)
    pieces = z.split([t.numel() for t in tensors])
    torch._foreach_add_(tensors, [piece.view_as(t) for piece, t in zip(pieces, tensors)])
    if alpha != 1.0:
        torch._foreach_mul_(tensors, alpha)


# -- dispatchers ------------------------------------------------------------------------------------------------------
# They run on the hot path of every step (~150 gradients): a pass groups its list once and looks up one work table
# per group, whose addresses are uploaded again only when they changed.
def same_kind_groups(tensors: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
    """The tensors grouped by (device, dtype), groups in order of first appearance, tensors in order."""
    first = tensors[0]
    if first.is_cuda:  # the usual case, one group, checked without building a torch.device per tensor
        dtypes, devices = [t.dtype for t in tensors], [t.get_device() for t in tensors]
        if dtypes.count(first.dtype) == len(tensors) and devices.count(devices[0]) == len(tensors):
            return [list(tensors)]
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _unsupported(tensors: Sequence[torch.Tensor]) -> Optional[str]:
    """Why the Triton path cannot take one (device, dtype) group, or None: a CUDA graph being captured (the work
    table's upload is a host-to-device copy), or a tensor that is not contiguous."""
    if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return "cannot run while a CUDA graph is being captured (its work table reaches the device by a host copy)"
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            return f"needs contiguous tensors, and tensor {i} ({list(t.shape)}, strides {t.stride()}) is not"
    return None


def _triton_applies(tensors: Sequence[torch.Tensor], backend: str, name: str) -> bool:
    """`use_triton` for one (device, dtype) group under the resolved ``backend``."""
    return use_triton(backend, tensors[0], name=name, unsupported=lambda: _unsupported(tensors))


def _launches(groups: List[List[torch.Tensor]], backend: Optional[str], name: str) -> List[Optional[Launch]]:
    """Per group, its (table, addresses) when the Triton path applies, else None (the reference)."""
    backend = resolve_backend(backend)
    return [work_table(group) if _triton_applies(group, backend, name) else None for group in groups]


def squared_norm(tensors: Sequence[torch.Tensor], *, backend: Optional[str] = None) -> torch.Tensor:
    """Σ_i ‖g_i‖² over a non-empty list → [1] on the first tensor's device, float32 (float64 when any tensor is).

    One Triton launch (and one sum) per dtype on CUDA, the foreach reference elsewhere (``backend``: see
    `use_triton`, as for every function below).

    Raises:
        ValueError: an empty list (the result's device comes from its first tensor).
    """
    if not tensors:
        raise ValueError("squared_norm needs at least one tensor: the result lives on the first one's device")
    groups = same_kind_groups(tensors)
    acc = accumulation_dtype_of(*(group[0].dtype for group in groups))
    device = groups[0][0].device
    total = None
    for group, launch in zip(groups, _launches(groups, backend, "squared_norm")):
        part = squared_norm_triton(group, launch) if launch is not None else squared_norm_reference(group)
        part = part.to(device=device, dtype=acc)
        total = part if total is None else total + part
    return total


def scale_(tensors: Sequence[torch.Tensor], coef: torch.Tensor, *, backend: Optional[str] = None) -> None:
    """g_i ← c · g_i in place for the whole list (an empty one included), e.g. clipping it as one vector.

    Args:
        tensors: the gradients g_1 … g_n (any devices and dtypes).
        coef: c, a one-element tensor read on the device (no host sync), e.g.
            `flashnorm.norms.rounding.clipping_coef` of `squared_norm`. The product is taken in float32
            (c rounded to float32 once) and rounded once to the tensor's dtype; float64 tensors keep c in float64.
    """
    if coef.numel() != 1:
        raise ValueError(f"coef must hold one element, got shape {tuple(coef.shape)}")
    if not tensors:
        return
    groups = same_kind_groups(tensors)
    for group, launch in zip(groups, _launches(groups, backend, "scale_")):
        first = group[0]
        c = coef.to(device=first.device, dtype=torch.float64 if first.dtype == torch.float64 else torch.float32)
        if launch is not None:
            scale_triton_(group, c, launch)
        else:
            scale_reference_(group, c)


def add_then_scale_(
    tensors: Sequence[torch.Tensor], z: torch.Tensor, alpha: float, *, backend: Optional[str] = None
) -> None:
    """g_i ← (g_i + z[o_i : o_i + numel(g_i)]) · alpha in place, for tensors of one device and dtype.

    Args:
        tensors: the gradients g_1 … g_n.
        z: [ν], ν = Σ numel(g_i): the values to add, flat, in the tensors' order (same device and dtype).
        alpha: the scale applied after the addition.
    """
    if len(same_kind_groups(tensors)) > 1 or z.dim() != 1 or z.numel() != sum(t.numel() for t in tensors):
        raise ValueError("add_then_scale_ takes tensors of one device and dtype and a flat z of their total size")
    if z.device != tensors[0].device or z.dtype != tensors[0].dtype:
        raise ValueError(f"z is {z.dtype} on {z.device}; the tensors are {tensors[0].dtype} on {tensors[0].device}")

    def unsupported() -> Optional[str]:
        return _unsupported(tensors) or (None if z.is_contiguous() else "needs a contiguous z")

    if use_triton(resolve_backend(backend), tensors[0], name="add_then_scale_", unsupported=unsupported):
        add_then_scale_triton_(tensors, z, alpha)
    else:
        add_then_scale_reference_(tensors, z, alpha)
