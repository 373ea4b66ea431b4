"""Multi-tensor passes of the DP tail (squared norm, scale, add-then-scale), Triton and reference, against float64.

On CPU the kernels run under TRITON_INTERPRET=1 (``CHUNK`` is lowered so that small tensors span several
table rows); bf16 (wrong in the interpreter) runs on the GPU only.
"""

import pytest
import torch

from flashnorm.kernels import multi_tensor
from flashnorm.norms.rounding import clipping_coef
from tests.conftest import TOLERANCES

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Odd sizes, an empty tensor, a 2-D tensor, and one spanning several chunks of 1024 elements.
SHAPES = [(1,), (37,), (0,), (600, 3), (1030,), (2501,)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 1024 elements, so that the table's row arithmetic (addresses, lengths, offsets) is exercised."""
    monkeypatch.setattr(multi_tensor, "CHUNK", 1024)
    monkeypatch.setattr(multi_tensor, "work_tables", type(multi_tensor.work_tables)())


def _tensors(dtype, device, shapes=SHAPES):
    return [torch.randn(shape, device=device).to(DTYPES[dtype]) for shape in shapes]


def _skip_bf16_on_cpu(dtype, device):
    if dtype == "bf16" and device.type == "cpu":
        pytest.skip("the interpreter computes bf16 wrongly: tested on the GPU")


@pytest.mark.parametrize("dtype", DTYPES)
def test_squared_norm_matches_float64(dtype, device, triton_backend):
    _skip_bf16_on_cpu(dtype, device)
    tensors = _tensors(dtype, device)
    out = multi_tensor.squared_norm(tensors)
    truth = sum(float(t.double().square().sum()) for t in tensors)
    assert out.shape == (1,) and out.dtype == torch.float32 and out.device == tensors[0].device
    torch.testing.assert_close(out.double().cpu(), torch.tensor([truth], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e4])  # clipping (c < 1) and not (c = 1)
def test_scale_matches_float64_and_reads_the_coefficient_on_the_device(dtype, max_norm, device, triton_backend):
    _skip_bf16_on_cpu(dtype, device)
    tensors = _tensors(dtype, device)
    before = [t.double() for t in tensors]
    norm_sq = torch.tensor([sum(float(b.square().sum()) for b in before)], device=device)
    multi_tensor.scale_(tensors, clipping_coef(norm_sq, None, max_norm))
    coef = min(1.0, max_norm / (float(norm_sq.double().sqrt()) + 1e-6))
    assert (coef < 1.0) == (max_norm < 1.0)
    rtol, atol = TOLERANCES[dtype]
    for t, b in zip(tensors, before):
        assert t.dtype == DTYPES[dtype]
        torch.testing.assert_close(t.double(), b * coef, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_sample_clip_is_the_norm_then_the_scale(dtype, device, triton_backend):
    """The B = 1 tail: s = squared_norm(gs) before clipping, then scale_(gs, clipping_coef(s))."""
    _skip_bf16_on_cpu(dtype, device)
    tensors = _tensors(dtype, device)
    before = [t.double() for t in tensors]
    truth = sum(float(b.square().sum()) for b in before)
    norm_sq = multi_tensor.squared_norm(tensors)
    multi_tensor.scale_(tensors, clipping_coef(norm_sq, None, 0.5))
    torch.testing.assert_close(norm_sq.double().cpu(), torch.tensor([truth], dtype=torch.float64), rtol=1e-5, atol=0)
    coef = 0.5 / (truth ** 0.5 + 1e-6)
    rtol, atol = TOLERANCES[dtype]
    for t, b in zip(tensors, before):
        torch.testing.assert_close(t.double(), b * coef, rtol=rtol, atol=atol)


def test_empty_lists_and_empty_tensors(device, triton_backend):
    """scale_ of no tensor does nothing; squared_norm of none has no device to live on; empty tensors add no row."""
    multi_tensor.scale_([], torch.full((1,), 0.5, device=device))
    with pytest.raises(ValueError, match="at least one tensor"):
        multi_tensor.squared_norm([])
    empty = [torch.zeros(0, device=device), torch.zeros(3, 0, device=device)]
    assert multi_tensor.squared_norm(empty).tolist() == [0.0]
    multi_tensor.scale_(empty, torch.full((1,), 0.5, device=device))
    assert [t.shape for t in empty] == [(0,), (3, 0)]
    with pytest.raises(ValueError, match="one element"):
        multi_tensor.scale_(_tensors("fp32", device), torch.ones(2, device=device))


def test_same_kind_groups_keep_the_order(device):
    a, b, c, d = (torch.zeros(2, device=device), torch.zeros(3, device=device, dtype=torch.float16),
                  torch.zeros(4, device=device), torch.zeros(5, device=device, dtype=torch.float16))
    groups = multi_tensor.same_kind_groups([a, b, c, d])
    assert [[t.numel() for t in g] for g in groups] == [[2, 4], [3, 5]]
    assert [[t.numel() for t in g] for g in multi_tensor.same_kind_groups([a, c])] == [[2, 4]]
    if device.type == "cuda":
        mixed = multi_tensor.same_kind_groups([a, torch.zeros(6), c])
        assert [[t.numel() for t in g] for g in mixed] == [[2, 4], [6]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_add_then_scale_matches_float64(dtype, alpha, device, triton_backend):
    _skip_bf16_on_cpu(dtype, device)
    tensors = _tensors(dtype, device)
    before = [t.double() for t in tensors]
    z = torch.randn(sum(t.numel() for t in tensors), device=device).to(DTYPES[dtype])
    multi_tensor.add_then_scale_(tensors, z, alpha)
    rtol, atol = TOLERANCES[dtype]
    for t, b, piece in zip(tensors, before, z.split([t.numel() for t in tensors])):
        torch.testing.assert_close(t.double(), (b + piece.double().view_as(b)) * alpha, rtol=rtol, atol=atol)


def test_triton_equals_the_reference_bit_for_bit_in_float32(device, monkeypatch):
    """One float32 rounding per operation in both: g + z, then · alpha; c · g."""
    tensors = _tensors("fp32", device)
    z = torch.randn(sum(t.numel() for t in tensors), device=device)
    copies = [t.clone() for t in tensors]
    multi_tensor.add_then_scale_triton_(tensors, z, 0.125)
    multi_tensor.add_then_scale_reference_(copies, z, 0.125)
    coef = clipping_coef(torch.tensor([7.25], device=device), None, 0.8)
    assert coef.dtype == torch.float32 and 0 < coef.item() < 1
    multi_tensor.scale_triton_(tensors, coef)
    multi_tensor.scale_reference_(copies, coef)
    for t, c in zip(tensors, copies):
        assert torch.equal(t, c)


def test_tables_are_cached_by_sizes_and_follow_new_addresses(device, triton_backend, monkeypatch):
    """One table per list of sizes; the addresses are uploaded again only when they changed, so gradients that moved
    are still found and unchanged ones cost no copy."""
    uploads = []
    upload = multi_tensor.upload_addresses
    monkeypatch.setattr(multi_tensor, "upload_addresses", lambda a, d: uploads.append(list(a)) or upload(a, d))
    tensors = _tensors("fp32", device)
    ones = torch.ones(1, device=device)
    multi_tensor.squared_norm(tensors)
    multi_tensor.scale_(tensors, ones)  # c = 1
    assert len(multi_tensor.work_tables) == 1, "the same sizes reuse their table"
    assert len(uploads) == 1, "the same addresses reuse their upload"
    moved = [t.clone() for t in tensors]  # same sizes, new addresses
    half = clipping_coef(torch.full((1,), 4.0, device=device), None, 1.0)  # c = 1 / (2 + 1e-6)
    multi_tensor.scale_(moved, half)
    assert len(multi_tensor.work_tables) == 1 and len(uploads) == 2 and uploads[-1] == [m.data_ptr() for m in moved]
    for t, m in zip(tensors, moved):
        torch.testing.assert_close(m, t / (2 + 1e-6))
    multi_tensor.scale_(moved[1:], half)
    assert len(multi_tensor.work_tables) == 2 and len(uploads) == 3


def _assert_mixed_list_is_exact(tensors, device):
    """squared_norm sums the (device, dtype) groups; scale_ applies one coefficient to all of them."""
    truth = sum(float(t.double().square().sum()) for t in tensors)
    torch.testing.assert_close(multi_tensor.squared_norm(tensors).double().cpu(), torch.tensor([truth], dtype=torch.float64),
                               rtol=1e-5, atol=0)
    before = [t.double() for t in tensors]
    multi_tensor.scale_(tensors, clipping_coef(torch.tensor([truth], device=device), None, 0.5))
    coef = 0.5 / (truth ** 0.5 + 1e-6)
    for t, x in zip(tensors, before):
        torch.testing.assert_close(t.double(), coef * x, rtol=1e-3, atol=1e-5)


def test_mixed_dtypes(device, triton_backend):
    """Groups by dtype, each through the Triton kernels; the norm sums the groups."""
    a, b = torch.randn(37, 5, device=device), torch.randn(11, 9, device=device)
    c = torch.randn(1030, device=device, dtype=torch.float16)
    _assert_mixed_list_is_exact([a, c, b], device)


def test_a_non_contiguous_tensor_sends_its_group_to_the_reference(device, monkeypatch):
    """Under backend="auto" a group with a non-contiguous tensor takes the foreach reference (on CUDA the other
    group still takes Triton); a forced Triton backend refuses it (tests/kernels/test_backend.py)."""
    monkeypatch.delenv("FLASHNORM_BACKEND", raising=False)
    calls = []
    kernel = multi_tensor.scale_triton_
    monkeypatch.setattr(multi_tensor, "scale_triton_", lambda group, *a: calls.append(group[0].dtype) or kernel(group, *a))
    a = torch.randn(37, 5, device=device)
    b = torch.randn(9, 11, device=device).t()  # non-contiguous
    c = torch.randn(1030, device=device, dtype=torch.float16)
    _assert_mixed_list_is_exact([a, c, b], device)
    assert calls == ([torch.float16] if device.type == "cuda" else [])


def test_float64_stays_float64(device, triton_backend):
    """float64 takes the float64 references under every backend: the norm, and c · g exactly."""
    tensors = [torch.randn(37, dtype=torch.float64, device=device), torch.randn(3, 4, dtype=torch.float64, device=device)]
    out = multi_tensor.squared_norm(tensors)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, sum(t.square().sum() for t in tensors).reshape(1), rtol=1e-12, atol=0)
    before = [t.clone() for t in tensors]
    coef = clipping_coef(out, None, 0.5)
    assert coef.dtype == torch.float64
    multi_tensor.scale_(tensors, coef)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b * coef)


def test_add_then_scale_refuses_a_mismatched_z(device):
    tensors = _tensors("fp32", device, shapes=[(3,), (4,)])
    with pytest.raises(ValueError, match="flat z of their total size"):
        multi_tensor.add_then_scale_(tensors, torch.zeros(6, device=device), 1.0)
    with pytest.raises(ValueError, match="float16"):
        multi_tensor.add_then_scale_(tensors, torch.zeros(7, device=device, dtype=torch.float16), 1.0)


@pytest.mark.gpu
def test_a_cuda_graph_capture_takes_the_reference_and_replays_correctly(monkeypatch):
    """The table upload is a host-to-device copy, illegal during capture: under backend="auto" the foreach reference
    is captured, with the coefficient computed in the graph from the norm."""
    monkeypatch.delenv("FLASHNORM_BACKEND", raising=False)
    tensors = _tensors("fp32", "cuda")
    norm_sq = torch.tensor([0.25], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        multi_tensor.scale_(tensors, clipping_coef(norm_sq, None, 1.0))
    torch.cuda.current_stream().wait_stream(stream)
    for t in tensors:
        t.fill_(3.0)
    norm_sq.fill_(16.0)  # c = 1 / (4 + 1e-6)
    graph.replay()
    torch.cuda.synchronize()
    for t in tensors:
        torch.testing.assert_close(t, torch.full_like(t, 3.0 / (4 + 1e-6)))


@pytest.mark.gpu
def test_a_forced_triton_backend_refuses_a_cuda_graph_capture(triton_backend):
    """backend="triton" never falls back to the reference: under capture the multi-tensor passes raise."""
    tensors = _tensors("fp32", "cuda")
    coef = torch.ones(1, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            multi_tensor.scale_(tensors, coef)
    torch.cuda.current_stream().wait_stream(stream)


@pytest.mark.gpu
def test_an_upload_is_not_reused_on_another_stream(triton_backend):
    """The device copy of the addresses is ordered on the stream that made it: another stream uploads its own."""
    tensors = _tensors("fp32", "cuda")
    truth = [t.double() / (2 + 1e-6) for t in tensors]
    multi_tensor.scale_(tensors, clipping_coef(torch.tensor([4.0], device="cuda"), None, 1.0))
    layout = next(iter(multi_tensor.work_tables.values()))
    first = layout.uploaded
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        multi_tensor.scale_(tensors, clipping_coef(torch.tensor([1e-12], device="cuda"), None, 1e4))  # c = 1
    torch.cuda.current_stream().wait_stream(stream)
    assert layout.uploaded[0] == stream.cuda_stream != first[0] and layout.uploaded[2] is not first[2]
    for t, x in zip(tensors, truth):
        torch.testing.assert_close(t.double(), x, rtol=1e-6, atol=1e-7)
