"""The Linear kernels' operands (flashnorm/kernels/operands.py): shape, device and dtype checks, the TMA policy (which
launches read through tensor descriptors or aligned copies), zero-padded aligned rows and their column blocks."""

import pytest
import torch

from flashnorm.kernels import operands
from flashnorm.kernels.operands import (
    ALIGNED_COPY_BYTES,
    TMA_MIN_ROWS_TF32,
    TMA_MIN_WORK,
    aligned_copies,
    aligned_copies_pay,
    aligned_copy_columns,
    check_sequence_pair,
    padded_to_aligned_rows,
    prepare_launch,
    prepare_pair,
    row_operands,
    tma_compatible,
    use_descriptors,
)
from flashnorm.kernels.triton_support import TensorDescriptor


@pytest.mark.parametrize("shapes", [((2, 3, 4), (2, 3)), ((2, 3), (2, 3, 4)), ((2, 3, 4), (2, 4, 5)),
                                    ((2, 3, 4), (3, 3, 5)), ((1, 2, 3, 4), (1, 2, 3, 4))])
def test_pairs_must_be_sequences_of_one_batch_and_length(shapes):
    x, g = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=r"expected x: \[B, T, d\] and g: \[B, T, p\] with the same B and T"):
        check_sequence_pair(x, g)
    with pytest.raises(ValueError, match="same B and T"):
        prepare_pair(x, g)


def test_prepare_pair_promotes_to_one_triton_dtype_and_makes_contiguous():
    x = torch.randn(2, 4, 3, dtype=torch.float16)
    g = torch.randn(2, 5, 4).transpose(1, 2)  # [2, 4, 5], not contiguous
    px, pg = prepare_pair(x, g)
    assert px.dtype == pg.dtype == torch.float32 and px.is_contiguous() and pg.is_contiguous()
    assert torch.equal(px, x.float()) and torch.equal(pg, g)
    same = torch.randn(2, 4, 3, dtype=torch.bfloat16)
    assert prepare_pair(same, same)[0] is same, "nothing copied when nothing needs to change"


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_prepare_pair_refuses_what_the_kernels_do_not_take(dtype):
    x, g = torch.zeros(2, 3, 4, dtype=dtype), torch.zeros(2, 3, 5, dtype=dtype)
    with pytest.raises(TypeError, match="reference"):
        prepare_pair(x, g)


def test_prepare_pair_refuses_two_devices():
    with pytest.raises(ValueError, match="move both to one device"):
        prepare_pair(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5, device="meta"))


@pytest.mark.parametrize("shapes,empty", [(((2, 3, 4), (2, 3, 5)), False), (((0, 3, 4), (0, 3, 5)), True),
                                          (((2, 0, 4), (2, 0, 5)), True), (((2, 3, 0), (2, 3, 5)), True),
                                          (((2, 3, 4), (2, 3, 0)), True)])
def test_prepare_launch_gives_a_zeroed_float32_norm_per_sample(shapes, empty):
    x, g = (torch.randn(s, dtype=torch.float16) for s in shapes)
    px, pg, norm_sq, nothing = prepare_launch(x, g)
    assert norm_sq.dtype == torch.float32 and norm_sq.shape == (x.shape[0],) and not norm_sq.any()
    assert nothing is empty and px.dtype == pg.dtype == torch.float16


def _aligned(rows, cols, dtype=torch.float16):
    return torch.zeros(rows, cols, dtype=dtype)


def test_tma_compatible_needs_aligned_base_and_rows():
    assert tma_compatible(_aligned(4, 8), _aligned(4, 16))
    assert not tma_compatible(_aligned(4, 9)), "18-byte rows"
    assert not tma_compatible(_aligned(4, 9)[:, :8]), "a view with 18-byte row stride"
    assert not tma_compatible(_aligned(4, 9).view(-1)[1:33].view(4, 8)), "a base 2 bytes past alignment"
    assert tma_compatible(torch.zeros(4, 4)), "16-byte float32 rows"


def test_no_descriptors_where_there_is_no_tma():
    """On CPU (no compute capability 9.x) neither descriptors nor aligned copies are ever chosen."""
    assert not use_descriptors(_aligned(1 << 16, 1 << 12), _aligned(1 << 16, 1 << 12))
    assert not aligned_copies_pay(_aligned(1 << 16, 1 << 12), _aligned(1 << 16, (1 << 12) + 1))


@pytest.fixture
def with_tma(monkeypatch, set_tf32):
    """As on compute capability 9.x, tf32 off; returns ``set_tf32`` to turn it on."""
    monkeypatch.setattr(operands, "supports_tma", lambda device: True)
    set_tf32(False)
    return set_tf32


def test_descriptors_from_tma_min_work_on(with_tma, monkeypatch):
    monkeypatch.setattr(operands, "TMA_MIN_WORK", 8 * 16 * 32)
    x, g = _aligned(8, 16), _aligned(8, 32)
    assert use_descriptors(x, g)
    assert not use_descriptors(x[:7], g[:7]), "one row short of the work"
    assert not use_descriptors(_aligned(8, 17), g), "unaligned rows never"
    assert not aligned_copies_pay(x, g), "aligned rows need no copies"


def test_float32_with_tf32_counts_rows(with_tma, monkeypatch):
    monkeypatch.setattr(operands, "TMA_MIN_WORK", 1)
    x, g = torch.zeros(TMA_MIN_ROWS_TF32, 4), torch.zeros(TMA_MIN_ROWS_TF32, 8)
    assert use_descriptors(x, g) and use_descriptors(x[:1], g[:1])
    with_tma(True)
    assert use_descriptors(x, g) and not use_descriptors(x[:-1], g[:-1])
    assert TMA_MIN_ROWS_TF32 == 1024 and TMA_MIN_WORK == 1 << 36


def test_aligned_copies_pay_for_large_unaligned_16_bit_launches(with_tma, monkeypatch):
    monkeypatch.setattr(operands, "TMA_MIN_WORK", 8 * 16 * 33)
    x, g = _aligned(8, 16), _aligned(8, 33)
    assert aligned_copies_pay(x, g) and not aligned_copies_pay(x[:7], g[:7])
    x32, g32 = torch.zeros(8, 16), torch.zeros(8, 33)
    assert aligned_copies_pay(x32, g32), "float32 with tf32 off"
    with_tma(True)
    assert not aligned_copies_pay(x32, g32), "tf32 takes its own K-major path"


@pytest.mark.parametrize("cols,dtype,padded", [(9, torch.float16, 16), (8, torch.float16, 8), (5, torch.float32, 8),
                                               (3, torch.bfloat16, 8), (2, torch.float64, 2)])
def test_padded_rows_are_aligned_with_zero_columns(cols, dtype, padded):
    m = torch.randn(2, 3, cols).to(dtype)
    out = padded_to_aligned_rows(m)
    assert out.shape == (2, 3, padded) and out.stride(-2) * out.element_size() % 16 == 0
    assert torch.equal(out[..., :cols], m) and not out[..., cols:].any()
    assert (out is m) == (padded == cols), "aligned rows are used as they are"


def test_padded_rows_of_an_aligned_width_view_are_a_contiguous_copy():
    base = torch.randn(2, 3, 16, dtype=torch.float16)
    view = base[..., 8:]  # 16-byte rows, but not contiguous
    out = padded_to_aligned_rows(view)
    assert out is not view and out.is_contiguous() and out.data_ptr() % 16 == 0 and torch.equal(out, view)


def test_aligned_copy_columns_is_a_multiple_of_the_tile_within_the_budget():
    rows, size = 1000, 2
    fit = ALIGNED_COPY_BYTES // (rows * size)
    cols = aligned_copy_columns(rows, 10**6, size)
    assert cols % 128 == 0 and cols <= fit < cols + 128
    assert aligned_copy_columns(rows, 100, size) == 100, "at most every column"
    assert aligned_copy_columns(10**9, 10**6, size) == 128, "at least one tile"
    assert aligned_copy_columns(rows, 10**6, size, multiple=64) % 64 == 0


@pytest.mark.parametrize("d,p,width", [(24, 301, 128), (301, 24, 128), (23, 9, 23), (24, 304, 304)])
def test_aligned_copies_put_the_wider_operand_in_blocks(d, p, width, monkeypatch):
    """The wider operand plays g (``swapped`` when it is x), read in aligned blocks of ``width`` columns (one tile
    here; all of them when its rows are aligned already); the narrower is copied whole, zero-padded."""
    monkeypatch.setattr(operands, "ALIGNED_COPY_BYTES", 1)
    x, g = torch.randn(2, 5, d, dtype=torch.float16), torch.randn(2, 5, p, dtype=torch.float16)
    layout = aligned_copies(x, g)
    narrow, wide = (x, g) if d <= p else (g, x)
    assert layout.swapped == (d > p) and layout.g is wide and layout.width == width
    assert layout.d == narrow.shape[-1] and layout.x2.shape[0] == 10 and tma_compatible(layout.x2)
    assert torch.equal(layout.x2[:, : layout.d], narrow.reshape(10, -1)) and not layout.x2[:, layout.d:].any()
    cols, pieces = wide.shape[-1], []
    for c0 in range(0, cols, width):
        block, n = layout.block(c0), min(width, cols - c0)
        assert tma_compatible(block) and block.shape[0] == 10 and not block[:, n:].any()
        pieces.append(block[:, :n])
    assert torch.equal(torch.cat(pieces, dim=1), wide.reshape(10, cols))


def test_row_operands_are_the_matrices_or_their_descriptors():
    x2, g2 = torch.randn(12, 8), torch.randn(12, 16)
    assert row_operands(x2, g2, False, 4, 8, 16) == (x2, g2)
    if TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    dx, dg = row_operands(x2, g2, True, 4, 8, 16)
    assert dx.base is x2 and list(dx.block_shape) == [4, 8] and list(dx.shape) == [12, 8]
    assert dg.base is g2 and list(dg.block_shape) == [4, 16] and list(dg.strides) == [16, 1]
