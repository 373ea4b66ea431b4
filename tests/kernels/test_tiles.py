"""Shared tile helpers: the tf32 rounding copy and the block sizes."""

import pytest
import torch

from flashnorm.kernels.tiles import block_size, tf32_copy

# The interpreter converts 0-d arrays with __index__ (numpy deprecation, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _round_tf32_torch(v):
    """Nearest tf32 (ties away from zero) by integer arithmetic on the float32 bits; NaN stays NaN."""
    rounded = ((v.view(torch.int32) + 0x1000) & -8192).view(torch.float32)
    return torch.where(v.isnan(), v, rounded)


@pytest.mark.parametrize("transpose", (False, True))
def test_tf32_copy_rounds_to_nearest(transpose, device):
    v = torch.randn(2, 37, 41, device=device) * torch.logspace(-30, 30, 41, device=device)
    v[0, 0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, 1 + 2**-11, -(1 + 2**-11)])
    buf, shape, strides = tf32_copy(v, transpose=transpose)
    want = _round_tf32_torch(v)
    want = want.transpose(1, 2).reshape(shape) if transpose else want.reshape(shape)
    got = torch.as_strided(buf, shape, strides)
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
    ties = got[4:6, 0] if transpose else got[0, 4:6]
    assert ties.tolist() == [1 + 2**-10, -(1 + 2**-10)]  # ties away from zero


@pytest.mark.parametrize("transpose", (False, True))
def test_tf32_copy_launch_settings_for_tools_change_nothing(transpose, device):
    """Other blocks and warps (the benchmarks' sweep) and a buffer of the caller's give the same copy."""
    v = torch.randn(2, 37, 41, device=device)
    buf, shape, strides = tf32_copy(v, transpose=transpose)
    out = torch.full((buf.numel() + 5,), float("nan"), device=device)
    got, shape2, strides2 = tf32_copy(v, transpose=transpose, block=(16, 32), num_warps=2, out=out)
    assert got is out and (shape2, strides2) == (shape, strides)
    assert torch.equal(torch.as_strided(out, shape, strides), torch.as_strided(buf, shape, strides))
    assert out[buf.numel() :].isnan().all()
    with pytest.raises(ValueError, match="at least"):
        tf32_copy(v, transpose=transpose, out=out[:10])


def test_block_size_is_a_capped_power_of_two_of_at_least_16():
    assert [block_size(n, 64) for n in (0, 1, 16, 17, 33, 64, 65, 1000)] == [16, 16, 16, 32, 64, 64, 64, 64]
