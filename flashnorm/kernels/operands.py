"""Operands of the Linear-layer kernels (flash, Gram, clipped gradient): x: [B, T, d] and g: [B, T, p] checked
and made contiguous, and the policy for reading them through TMA tensor descriptors or plain pointers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backend import supports_tma, tf32_enabled
from .triton_support import TensorDescriptor

#: Input dtypes the Triton kernels take (float64 always goes to the reference, which stays float64).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Work (rows · d · p) from which 16-bit and float32 (tf32 off) launches use tensor descriptors by default.
#: The launcher encodes two tensor maps per launch: tens of µs more host time, for a GPU saving of a few µs
#: per launch in bf16 and none in float32. Below this work
#: (≈ 0.2 ms of bf16 tiles; GPT-2 at B = 8, T = 1024 has 1.5-1.9·10¹⁰ per layer) a step tends to wait for
#: the host, not the GPU, so pointer loads are faster where it counts.
TMA_MIN_WORK = 1 << 36
#: float32 with tf32: rows (B·T) from which descriptors are used. They enable the K-major tf32 path, whose
#: faster tiles repay the descriptors' host time on its long launches.
TMA_MIN_ROWS_TF32 = 1024
#: Bytes of the aligned copies made at once of an operand whose rows are not 16-byte aligned (a block of its
#: columns, `aligned_copy_columns`): a vocabulary of 50257 bf16 logits per row, GPT-2's LM head, is one.
ALIGNED_COPY_BYTES = 1 << 27


def check_sequence_pair(x: torch.Tensor, g: torch.Tensor) -> None:
    """Raises ValueError unless x: [B, T, d] and g: [B, T, p] share B and T."""
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"expected x: [B, T, d] and g: [B, T, p] with the same B and T; got {tuple(x.shape)} and {tuple(g.shape)}"
        )


def prepare_pair(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, contiguous x: [B, T, d] and g: [B, T, p] of one Triton dtype (promoted if they differ).

    Raises:
        ValueError: shapes that are not [B, T, d] and [B, T, p], or tensors on different devices.
        TypeError: a dtype the Triton kernels do not take (float64 and others: use the reference).
    """
    check_sequence_pair(x, g)
    if x.device != g.device:
        raise ValueError(f"x is on {x.device} but g is on {g.device}; move both to one device.")
    dtype = torch.promote_types(x.dtype, g.dtype)
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"the Triton norm kernels take float32, float16 or bfloat16 inputs, got {x.dtype} and {g.dtype}; "
            "use the *_reference functions (float64 stays float64 there)."
        )
    return x.to(dtype).contiguous(), g.to(dtype).contiguous()


def prepare_launch(x: torch.Tensor, g: torch.Tensor):
    """`prepare_pair`, plus the zeroed float32 output [B] and whether any size is 0 (nothing to launch).

    Returns:
        (x, g, norm_sq, empty).
    """
    x, g = prepare_pair(x, g)
    norm_sq = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    return x, g, norm_sq, 0 in (*x.shape, g.shape[-1])


def use_descriptors(x2: torch.Tensor, g2: torch.Tensor) -> bool:
    """Default of ``use_tma`` for row-major x2: [rows, d], g2: [rows, p]: compute capability 9.x, aligned rows,
    and at least ``TMA_MIN_WORK`` of work (``TMA_MIN_ROWS_TF32`` rows for float32 with tf32)."""
    if not (supports_tma(x2.device) and tma_compatible(x2, g2)):
        return False
    if x2.dtype == torch.float32 and tf32_enabled():
        return x2.shape[0] >= TMA_MIN_ROWS_TF32
    return x2.shape[0] * x2.shape[1] * g2.shape[1] >= TMA_MIN_WORK


def aligned_copies_pay(x2: torch.Tensor, g2: torch.Tensor) -> bool:
    """Whether a launch over row-major x2: [rows, d], g2: [rows, p] whose rows are not all 16-byte aligned should
    read zero-padded aligned copies through tensor descriptors: compute capability 9.x, 16-bit inputs (or float32
    with tf32 off) and at least ``TMA_MIN_WORK`` of work. Unaligned rows rule out vectorised and asynchronous
    loads: the pointer path then runs at a small fraction of the descriptor path's throughput, while the copies
    cost one read and one write of the operand."""
    if not supports_tma(x2.device) or tma_compatible(x2, g2):
        return False
    if x2.dtype == torch.float32 and tf32_enabled():
        return False
    return x2.shape[0] * x2.shape[1] * g2.shape[1] >= TMA_MIN_WORK


def padded_to_aligned_rows(m: torch.Tensor) -> torch.Tensor:
    """m: [n, T, k] itself when its rows are 16-byte aligned, else a copy [n, T, k'] zero-padded to the next
    k' whose rows are (zero columns add nothing to ‖G_bᵀX_b‖² nor to Gram products)."""
    pad = -m.shape[-1] % (16 // m.element_size())
    if pad:
        return torch.nn.functional.pad(m, (0, pad))
    if m.is_contiguous() and m.data_ptr() % 16 == 0:
        return m
    return m.clone(memory_format=torch.contiguous_format)  # (a fresh block is aligned)


def aligned_copy_columns(rows: int, cols: int, element_size: int, multiple: int = 128) -> int:
    """Columns of a [rows, cols] operand copied at once: as many as fit ``ALIGNED_COPY_BYTES``, a multiple of
    ``multiple`` (a tile width), at least one multiple, at most all of them."""
    fit = ALIGNED_COPY_BYTES // max(1, rows * element_size) // multiple * multiple
    return min(max(multiple, fit), cols)


class AlignedCopies(NamedTuple):
    """How a launch over x: [B, T, d], g: [B, T, p] whose rows are not all 16-byte aligned reads aligned copies.

    The wider operand plays g (``swapped`` when that is x: ‖G_bᵀX_b‖ and Σ_b c_b X_bᵀG_b = (Σ_b c_b G_bᵀX_b)ᵀ
    allow it) and is copied one block of ``width`` columns at a time (`block`), so the peak memory moves by
    one block whatever B and T; the narrower, ``x2``, is copied whole, zero-padded (``d`` columns before).
    """

    swapped: bool
    x2: torch.Tensor  # [B·T, d'] aligned rows
    d: int
    g: torch.Tensor  # [B, T, p], the wider operand
    width: int  # columns per block of g

    def block(self, c0: int) -> torch.Tensor:
        """g's columns [c0, c0 + width) as an aligned [B·T, cols] copy (the last block zero-padded; g itself when
        its rows are aligned)."""
        block = padded_to_aligned_rows(self.g[:, :, c0 : c0 + self.width])
        return block.view(-1, block.shape[-1])


def aligned_copies(x: torch.Tensor, g: torch.Tensor) -> AlignedCopies:
    """The `AlignedCopies` layout of contiguous x: [B, T, d], g: [B, T, p]."""
    swapped = x.shape[-1] > g.shape[-1]
    if swapped:
        x, g = g, x
    batch, steps, d = x.shape
    p = g.shape[-1]
    width = p if tma_compatible(g.view(batch * steps, p)) else aligned_copy_columns(batch * steps, p, g.element_size())
    return AlignedCopies(swapped, padded_to_aligned_rows(x).view(batch * steps, -1), d, g, width)


def row_operands(x2: torch.Tensor, g2: torch.Tensor, use_tma: bool, block_rows: int, block_x: int, block_g: int):
    """The kernels' (x_desc, g_desc) for row-major x2: [rows, d], g2: [rows, p]: tensor descriptors with
    [block_rows, block_x] and [block_rows, block_g] boxes when ``use_tma``, else the matrices themselves."""
    if not use_tma:
        return x2, g2
    return TensorDescriptor.from_tensor(x2, [block_rows, block_x]), TensorDescriptor.from_tensor(g2, [block_rows, block_g])


def tma_compatible(*matrices: torch.Tensor) -> bool:
    """Whether 2-D row-major matrices meet the tensor-descriptor rules (16-byte aligned base and rows, < 2³¹ rows)."""
    return all(
        m.data_ptr() % 16 == 0 and (m.stride(0) * m.element_size()) % 16 == 0 and m.shape[0] < 2**31 for m in matrices
    )
