"""Flash norms ‖G_bᵀX_b‖² (Triton kernel and PyTorch reference) against a float64 truth.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py); bf16 is GPU-only
(the interpreter computes it wrongly), see test_flash_norm_gpu.py.
"""

import pytest
import torch

from flashnorm.kernels import flash_norm_sq, flash_norm_sq_reference, operands
from flashnorm.kernels.flash_norm import FlashConfig, flash_norm_config, flash_norm_splits, flash_norm_sq_triton
from tests.conftest import TOLERANCES
from tests.kernels.truth import (
    assert_default_takes_aligned_copies,
    assert_float64_takes_the_float64_reference,
    assert_matches_float64,
    assert_norms_close,
    assert_reference_matches_float64,
    nan_bordered_pair,
    norm_sq_float64,
    random_pair,
    skip_without_tma,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
STEPS = (1, 37, 600, 1030)
# The interpreter converts 0-d arrays with __index__ (numpy deprecation, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
# d and p are not multiples of the interpreter's 64-wide tiles (nor of the GPU's 128/256).
D, P = 72, 40


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("batch", (0, 1, 3))
def test_triton_matches_float64(dtype, steps, batch, device, triton_backend):
    assert_matches_float64(flash_norm_sq, batch, steps, D, P, DTYPES[dtype], device, TOLERANCES[dtype])


@pytest.mark.parametrize(
    "use_tma,d,p", [(False, 23, 9), (True, 72, 40), (True, 23, 9)], ids=["pointers-odd", "tma-aligned", "tma-aligned-copies"]
)
@pytest.mark.parametrize("splits", (1, 3, 64))
@pytest.mark.parametrize("steps", (37, 1030))
def test_every_path_is_exact(use_tma, d, p, splits, steps, device):
    """Pointer and descriptor loads, with and without T-split (64 splits > T blocks: clamped)."""
    skip_without_tma(use_tma, device)
    x, g = random_pair(3, steps, d, p, torch.float32, device)
    cfg = FlashConfig(block_t=32, block_p=16, block_d=32, num_warps=4, num_stages=1)
    out = flash_norm_sq_triton(x, g, config=cfg, splits=splits, use_tma=use_tma)
    assert_norms_close(out, norm_sq_float64(x, g), TOLERANCES["fp32"])


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,p", [(23, 301), (301, 23)], ids=["g-wider", "x-wider"])
def test_unaligned_rows_copied_in_column_blocks_are_exact(dtype, d, p, steps, device, monkeypatch):
    """Rows that are not 16-byte aligned (an odd vocabulary in miniature) are read through descriptors from aligned
    copies: the wider operand as G in blocks of 128 columns (here three launches, the last block zero-padded),
    the narrower copied whole."""
    from flashnorm.kernels import flash_norm

    skip_without_tma(True, device)
    launches = []
    original = flash_norm.launch_tiles
    monkeypatch.setattr(flash_norm, "launch_tiles", lambda *a: launches.append(a[8]) or original(*a))
    monkeypatch.setattr(operands, "ALIGNED_COPY_BYTES", 1)
    x, g = random_pair(3, steps, d, p, DTYPES[dtype], device)
    out = flash_norm_sq_triton(x, g, use_tma=True)
    assert_norms_close(out, norm_sq_float64(x, g), TOLERANCES[dtype])
    assert launches == [128, 128, 48]  # columns per launch: 301 = 128 + 128 + 45, padded to 16 bytes
    padded = operands.padded_to_aligned_rows(g)
    assert padded.shape[-1] * padded.element_size() % 16 == 0 and torch.equal(padded[..., :p], g)
    assert not padded[..., p:].any()


def test_default_launch_takes_aligned_copies_where_they_pay(device, monkeypatch):
    """The default policy (compute capability 9.x, 16-bit, work ≥ TMA_MIN_WORK, unaligned rows) routes the launch
    through the aligned copies; aligned rows never are."""
    from flashnorm.kernels import flash_norm

    assert_default_takes_aligned_copies(
        monkeypatch, flash_norm, "launch_on_aligned_copies", flash_norm_sq_triton,
        lambda out, x, g: assert_norms_close(out, norm_sq_float64(x, g), TOLERANCES["fp16"]), device,
    )


def test_t_split_sums_each_tile_once_in_split_order(device):
    """The last-arriving program of a tile sums its partials in split order: every tile counted once (the norm
    matches float64), and the bits do not depend on which program happened to arrive last."""
    x, g = random_pair(3, 1030, 72, 40, torch.float32, device)
    cfg = FlashConfig(block_t=64, block_p=64, block_d=128, num_warps=4, num_stages=1)
    runs = [flash_norm_sq_triton(x, g, config=cfg, splits=5) for _ in range(3)]
    assert_norms_close(runs[0], norm_sq_float64(x, g), TOLERANCES["fp32"])
    for run in runs[1:]:
        assert torch.equal(run, runs[0])


@pytest.mark.parametrize("use_tma", (False, True), ids=["pointers", "tma"])
@pytest.mark.parametrize("splits", (1, 3))
def test_rows_past_t_contribute_nothing(use_tma, splits, device):
    """A NaN sample next door and NaN memory past the last row leave the other samples exact."""
    skip_without_tma(use_tma, device)
    x, g = nan_bordered_pair(3, 37, 72, 40, device)
    x[1, 5] = float("nan")  # sample 1 is poisoned; samples 0 and 2 border it
    cfg = FlashConfig(block_t=32, block_p=64, block_d=64, num_warps=4, num_stages=1)
    out = flash_norm_sq_triton(x, g, config=cfg, splits=splits, use_tma=use_tma)
    assert torch.isnan(out[1])
    keep = torch.tensor([0, 2], device=device)
    assert_norms_close(out[keep], norm_sq_float64(x[keep], g[keep]), TOLERANCES["fp32"])


@pytest.mark.parametrize("g_rows", (False, True), ids=["k-major", "k-major-x-only"])
def test_k_major_rows_past_t_contribute_nothing(g_rows, device, set_tf32):
    """The tf32 K-major paths: a NaN in a neighbour's g and NaN memory past the last row stay out."""
    skip_without_tma(True, device)
    set_tf32(True)
    x, g = nan_bordered_pair(3, 37, 72, 40, device)
    g[1, 36] = float("nan")  # the last row of sample 1, next to sample 2's first
    cfg = FlashConfig(block_t=32, block_p=32, block_d=64, num_warps=4, num_stages=1)
    out = flash_norm_sq_triton(x, g, config=cfg, use_tma=True, k_major=True, g_rows=g_rows)
    assert torch.isnan(out[1])
    keep = torch.tensor([0, 2], device=device)
    assert_norms_close(out[keep], norm_sq_float64(x[keep], g[keep]), TOLERANCES["tf32"])


@pytest.mark.parametrize("k_major,g_rows", [(False, None), (True, False), (True, True)],
                         ids=["mn-major", "k-major", "k-major-x-only"])
@pytest.mark.parametrize("splits", (1, 3))
@pytest.mark.parametrize("steps", (1, 37, 1030))
def test_tf32_paths_are_unbiased(k_major, g_rows, splits, steps, device, set_tf32):
    """tf32 dots on operands rounded to nearest: within the tf32 tolerance (truncation would miss it).
    K-major x-only: g through a [B, T, p] descriptor, whose zero fill past T keeps samples apart."""
    skip_without_tma(k_major, device)
    set_tf32(True)
    x, g = random_pair(3, steps, D, P, torch.float32, device)
    cfg = FlashConfig(block_t=32, block_p=32, block_d=64, num_warps=4, num_stages=1)
    out = flash_norm_sq_triton(x, g, config=cfg, splits=splits, use_tma=k_major, k_major=k_major, g_rows=g_rows)
    assert_norms_close(out, norm_sq_float64(x, g), TOLERANCES["tf32"])


def test_k_major_needs_tf32(device, set_tf32):
    set_tf32(False)
    x, g = random_pair(1, 8, D, P, torch.float32, device)
    with pytest.raises(ValueError, match="K-major layout is the tf32 path"):
        flash_norm_sq_triton(x, g, use_tma=True, k_major=True)


def test_non_contiguous_and_mixed_dtypes(device, triton_backend):
    x = torch.randn(2, D, 37, device=device).transpose(1, 2)  # [B, T, d] with stride 1 along T
    g = torch.randn(2, 37, 2 * P, device=device).half()[..., ::2]  # strided columns, another dtype
    assert not x.is_contiguous() and not g.is_contiguous()
    assert_norms_close(flash_norm_sq(x, g), norm_sq_float64(x, g.float()), TOLERANCES["fp32"])


def test_float64_takes_the_float64_reference(device, triton_backend):
    assert_float64_takes_the_float64_reference(flash_norm_sq, D, P, device)


@pytest.mark.parametrize("shapes", [((2, 5, 3), (2, 6, 4)), ((2, 5, 3), (5, 4)), ((5, 3), (5, 4))])
def test_bad_shapes_are_rejected(shapes, device, triton_backend):
    x, g = (torch.randn(s, device=device) for s in shapes)
    with pytest.raises(ValueError, match=r"expected x: \[B, T, d\]"):
        flash_norm_sq(x, g)


@pytest.mark.parametrize("dtype", ("fp32", "fp64"))
@pytest.mark.parametrize("steps", STEPS)
def test_reference_matches_float64(dtype, steps):
    assert_reference_matches_float64(flash_norm_sq_reference, dtype, steps, D, P, TOLERANCES["fp32"])


def test_reference_handles_empty_batch():
    assert flash_norm_sq_reference(torch.randn(0, 4, 3), torch.randn(0, 4, 5)).shape == (0,)


def test_t_split_choice():
    cfg = FlashConfig(block_t=64, block_p=128, block_d=256, num_warps=8, num_stages=3)
    # 8 samples × 32 tiles fill 132 SMs twice: splitting would only add workspace traffic
    assert flash_norm_splits(8, 4096, 32, cfg, 132, torch.bfloat16) == 1
    # 1 sample × 32 tiles: four programs per sample fill one wave
    assert flash_norm_splits(1, 4096, 32, cfg, 132, torch.bfloat16) == 4
    # never fewer than MIN_BLOCKS_PER_SPLIT blocks of T per program
    assert flash_norm_splits(1, 128, 1, cfg, 132, torch.bfloat16) == 1
    for steps in (1, 37, 600, 1030, 4100, 65536):
        assert 1 <= flash_norm_splits(1, steps, 3, cfg, 132, torch.float32) <= max(1, -(-steps // 256))


def test_under_filled_16_bit_configs():
    """Tiles by how well batch × tiles fills 132 SMs (the H200 sweeps of docs/performance.md)."""
    config = lambda batch, d, p: flash_norm_config(d, p, torch.bfloat16, batch=batch, n_sms=132)  # noqa: E731
    assert config(8, 1024, 1024) == FlashConfig(64, 128, 256, 8, 3)  # 256 big tiles: full
    assert config(1, 1024, 1024) == FlashConfig(128, 64, 128, 4, 4)  # 128 small tiles: one deep-pipelined wave
    assert config(3, 1024, 1024) == FlashConfig(64, 64, 128, 4, 3)  # 384 small tiles: three per SM
    assert config(1, 4096, 4096) == FlashConfig(64, 128, 256, 8, 3)  # 512 big tiles: full
