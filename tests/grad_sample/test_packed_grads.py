"""Packed per-sample gradients (flashnorm/grad_sample/packed_grads.py): PackedPerSampleGrads's reserve, slot, store,
finish, norms and clipped sum against float64 loops (buffers split at CHUNK_BYTES, one per dtype), what
plan_packed_grads reserves, and the modules' packed steps against the float64 oracle."""

import pytest
import torch
import torch.nn as nn

from flashnorm.grad_sample import GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse
from flashnorm.grad_sample import layer_groups, packed_grads
from flashnorm.grad_sample.packed_grads import PackedPerSampleGrads
from tests.grad_sample.direct import TwoHeads, wrap


@pytest.mark.parametrize("use_second", [False, True])
def test_one_pass_keeps_per_sample_gradients_in_one_buffer(use_second):
    """Small layers are packed: all their clipped gradients are views of one sum, exact against the
    float64 oracle, and a hooked layer the loss never reaches gets zeros (its slot is never read unwritten)."""
    from tests.oracle import microbatch_reference

    torch.manual_seed(0)
    model = TwoHeads(use_second=use_second).double()
    x, y = torch.randn(4, 7, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    oracle = microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), 0.1)
    gsm, _, criterion = wrap(GradSampleModuleFastGradientClippingFuse, model)
    criterion(gsm(x), y).backward()
    assert all(layer.plan[1] == "per_sample" for layer in gsm.layers)
    storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1, "every per-sample gradient should be summed by one weighted sum of the packed buffer"
    torch.testing.assert_close(gsm.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)
    if not use_second:
        assert torch.count_nonzero(model.unused.weight.grad) == 0
    assert gsm.step is None, "the packed buffers are released once the gradients are assembled (with the step)"


@pytest.mark.parametrize("method", ["flash", "gram"])
@pytest.mark.parametrize("frozen", [None, "trunk.weight", "trunk.bias"])
def test_one_pass_keeps_biases_of_kernel_layers_packed(monkeypatch, method, frozen):
    """A Linear whose weight takes a norm kernel, counted on its own (no layer group: tests/grad_sample/
    test_layer_groups.py), keeps its bias's per-sample gradients packed (one norm and one clipped sum with the
    LayerNorm's); exact against the float64 oracle, frozen parameters included."""
    from tests.oracle import microbatch_reference

    monkeypatch.setattr(layer_groups, "GROUP_MAX_ELEMENTS", 0)
    torch.manual_seed(0)
    model = TwoHeads(use_second=True).double()
    if frozen is not None:
        model.get_parameter(frozen).requires_grad_(False)
    x, y = torch.randn(4, 7, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    oracle = microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), 0.1)
    gsm, _, criterion = wrap(GradSampleModuleFastGradientClippingFuse, model, norm_method=method)
    criterion(gsm(x), y).backward()
    linears = [layer for layer in gsm.layers if isinstance(layer.module, nn.Linear)]
    assert all(layer.plan[1] == method for layer in linears)
    packed_storage = model.norm.weight.grad.untyped_storage().data_ptr()
    for layer in linears:
        bias, weight = layer.module.bias, layer.module.weight
        if bias.requires_grad:
            packed = bias.grad.untyped_storage().data_ptr() == packed_storage
            assert packed == weight.requires_grad, f"{layer.name}.bias: packed only beside a trainable weight"
    torch.testing.assert_close(gsm.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)
        else:
            assert p.grad is None


@pytest.mark.parametrize("method", ["flash", "gram", "per_sample"])
def test_two_pass_norms_pack_only_vector_parameters(monkeypatch, method):
    """In the norm pass of a two-pass mode, biases and normalisation weights are packed (one norm per
    buffer); matrices never are, even when planned per sample. The packed buffers are released before the
    second pass, and norms and clipped gradients are exact against the float64 oracle."""
    from tests.oracle import microbatch_reference

    reserved = []
    original = PackedPerSampleGrads.reserve
    monkeypatch.setattr(PackedPerSampleGrads, "reserve", lambda self, p, dtype: (reserved.append(p), original(self, p, dtype))[1])
    torch.manual_seed(0)
    model = TwoHeads(use_second=True).double()
    x, y = torch.randn(4, 7, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    oracle = microbatch_reference(model, x, y, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), 0.1)
    gsm, _, criterion = wrap(GradSampleModuleFastGradientClipping, model, norm_method=method)
    loss = criterion(gsm(x), y)
    gsm.compute_clipping_coef(loss.loss_per_sample)
    vectors = {id(p) for p in model.parameters() if p.dim() == 1}
    assert reserved and {id(p) for p in reserved} == vectors, "exactly the vector parameters are packed"
    assert gsm.step.packed is None, "the two-pass norm pass releases its packed buffers"
    torch.testing.assert_close(gsm.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)
    gsm.write_clipped_gradients(loss.loss_per_sample, gsm.get_clipping_coef())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=1e-10, atol=1e-12)


# -- PackedPerSampleGrads on its own ---------------------------------------------------------------------------
B = 4


def _parameters(*shapes, dtype=torch.float64):
    return [nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]


def _per_sample(params, dtype=torch.float64):
    """Standard normal per-sample gradients {θ: [B, *θ.shape]} in ``dtype``."""
    return {p: torch.randn(B, *p.shape, dtype=dtype) for p in params}


def _norms(grads) -> torch.Tensor:
    """‖(g_θ,b)_θ‖ over the given per-sample gradients, in float64, one sample at a time."""
    return torch.stack([
        torch.sqrt(sum(g[b].double().square().sum() for g in grads.values())) for b in range(B)
    ])


def _clipped(grads, coef):
    """Σ_b c_b g_b per θ, in float64, one sample at a time."""
    return {p: sum(coef[b].double() * g[b].double() for b in range(B)) for p, g in grads.items()}


def _packed(params, dtype=torch.float64):
    packed = PackedPerSampleGrads(B, torch.device("cpu"))
    for p in params:
        packed.reserve(p, dtype)
    return packed


def test_written_slots_give_the_float64_norms_and_clipped_sums():
    """Three ways to fill a slot (in place, copied by store, in place then store of another view of it): one buffer,
    one norm per sample, and Σ_b c_b g_b handed out as views of one flat sum."""
    params = _parameters((3, 5), (5,), (2, 2, 2))
    grads = _per_sample(params)
    packed = _packed(params)
    first = packed.slot(params[0])
    assert first.shape == (B, 3, 5) and packed.slot(params[0]) is first
    first.copy_(grads[params[0]])
    assert packed.store(params[0], first)
    assert packed.store(params[1], grads[params[1]])  # a tensor of its own: copied into the slot
    packed.slot(params[2]).copy_(grads[params[2]])
    assert packed.store(params[2], packed.slot(params[2]).view(B, 8).view(B, 2, 2, 2))
    packed.finish()
    norms = packed.norms()
    assert len(norms) == 1 and norms[0].dtype == torch.float64
    torch.testing.assert_close(norms[0], _norms(grads), rtol=1e-12, atol=1e-14)
    coef = torch.rand(B, dtype=torch.float64)
    sums = packed.clipped_sum(coef)
    expected = _clipped(grads, coef)
    for p in params:
        assert sums[p].shape == p.shape and sums[p].dtype == p.dtype
        torch.testing.assert_close(sums[p], expected[p], rtol=1e-12, atol=1e-14)
    assert len({s.untyped_storage().data_ptr() for s in sums.values()}) == 1, "one weighted sum per buffer"


def test_float32_buffers_accumulate_in_float32():
    params = _parameters((4, 3), (3,), dtype=torch.float32)
    grads = _per_sample(params, torch.float32)
    packed = _packed(params, torch.float32)
    for p, g in grads.items():
        assert packed.store(p, g)
    packed.finish()
    (norm,) = packed.norms()
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), _norms(grads), rtol=1e-5, atol=1e-7)
    coef = torch.rand(B)
    expected = _clipped(grads, coef)
    for p, grad in packed.clipped_sum(coef).items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), expected[p], rtol=1e-5, atol=1e-7)


def test_slots_are_allocated_on_first_use_and_unwritten_slots_read_zero():
    """A buffer is allocated when its first slot is asked for; after finish a slot nobody wrote holds zeros (it adds
    nothing to the norm and gets a zero sum), and a buffer never allocated gives no norm and no sum."""
    params = _parameters((3,), (2, 3))
    packed = _packed(params)
    assert packed.norms() == [] and packed.clipped_sum(torch.ones(B, dtype=torch.float64)) == {}
    packed.slot(params[0]).fill_(float("nan"))  # what an uninitialised buffer may hold
    grads = _per_sample(params[1:])
    assert packed.store(params[1], grads[params[1]])
    packed.finish()
    torch.testing.assert_close(packed.norms()[0], _norms(grads), rtol=1e-12, atol=1e-14)
    sums = packed.clipped_sum(torch.ones(B, dtype=torch.float64))
    assert torch.equal(sums[params[0]], torch.zeros(3, dtype=torch.float64))


def test_store_refuses_what_does_not_fit_its_slot():
    """Another dtype, another shape, or a parameter with no room: ``False``, the slot left alone."""
    (p,) = params = _parameters((2, 3))
    stranger = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    packed = _packed(params)
    assert packed.slot(stranger) is None
    packed.slot(p).fill_(7.0)
    assert not packed.store(p, torch.randn(B, 2, 3, dtype=torch.float32))
    assert not packed.store(p, torch.randn(B, 3, 2, dtype=torch.float64))
    assert not packed.store(stranger, torch.randn(B, 2, 3, dtype=torch.float64))
    assert torch.all(packed.slot(p) == 7.0)
    packed.finish()
    assert torch.equal(packed.norms()[0], torch.zeros(B, dtype=torch.float64)), "unwritten: zeros after finish"


def test_buffers_close_at_chunk_bytes(monkeypatch):
    """A buffer takes parameters until the next would pass CHUNK_BYTES; a parameter larger than that gets a buffer of
    its own. Each buffer has its norm and its one weighted sum; together they are the float64 loop's."""
    monkeypatch.setattr(packed_grads, "CHUNK_BYTES", B * 10 * 8)  # ten float64 elements per sample
    params = _parameters((6,), (2, 2), (3, 4), (1,))  # [6 + 4], [12], [1]
    grads = _per_sample(params)
    packed = _packed(params)
    assert packed.slot(params[2]) is not None and len(packed.norms()) == 1, "only the buffer asked for is allocated"
    for p, g in grads.items():
        assert packed.store(p, g)
    packed.finish()
    norms = packed.norms()
    assert len(norms) == 3
    groups = [params[:2], params[2:3], params[3:]]
    for norm, group in zip(norms, groups):
        torch.testing.assert_close(norm, _norms({p: grads[p] for p in group}), rtol=1e-12, atol=1e-14)
    coef = torch.rand(B, dtype=torch.float64)
    sums, expected = packed.clipped_sum(coef), _clipped(grads, coef)
    for p in params:
        torch.testing.assert_close(sums[p], expected[p], rtol=1e-12, atol=1e-14)
    storages = [{sums[p].untyped_storage().data_ptr() for p in group} for group in groups]
    assert all(len(s) == 1 for s in storages) and len(set.union(*storages)) == 3


def test_one_buffer_per_dtype_and_sums_cast_to_the_parameter_dtype():
    """Reservations of two dtypes interleaved: one buffer each, norms in their accumulation dtype; a bf16 parameter
    kept in a float32 buffer gets the float32 sum cast to bf16 once."""
    wide, half = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    exact = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    packed = PackedPerSampleGrads(B, torch.device("cpu"))
    for p, dtype in ((wide, torch.float32), (exact, torch.float64), (half, torch.float32)):
        packed.reserve(p, dtype)
    grads = {wide: torch.randn(B, 3, 2), half: torch.randn(B, 4), exact: torch.randn(B, 5, dtype=torch.float64)}
    for p, g in grads.items():
        assert packed.store(p, g)
    packed.finish()
    norms = packed.norms()
    assert [n.dtype for n in norms] == [torch.float32, torch.float64]
    torch.testing.assert_close(norms[0].double(), _norms({wide: grads[wide], half: grads[half]}), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(norms[1], _norms({exact: grads[exact]}), rtol=1e-12, atol=1e-14)
    coef = torch.rand(B)
    sums, expected = packed.clipped_sum(coef), _clipped(grads, coef)
    assert sums[half].dtype == torch.bfloat16 and sums[wide].dtype == torch.float32
    assert sums[exact].dtype == torch.float64
    assert sums[half].untyped_storage().data_ptr() != sums[wide].untyped_storage().data_ptr()
    torch.testing.assert_close(sums[half].double(), expected[half], rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(sums[wide].double(), expected[wide], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sums[exact], expected[exact], rtol=1e-12, atol=1e-14)


# -- plan_packed_grads ------------------------------------------------------------------------------------------
def _planned(monkeypatch, model, method, vectors_only, x):
    """[(parameter name, dtype)] that plan_packed_grads reserves, in order, after a training forward of ``model`` on
    ``x`` with every layer planned ``method``, and the plan itself (the captures listed in the layers' order, as the
    step lists them)."""
    reservations = []
    reserve = PackedPerSampleGrads.reserve
    monkeypatch.setattr(PackedPerSampleGrads, "reserve",
                        lambda self, p, dtype: (reservations.append((p, dtype)), reserve(self, p, dtype))[1])
    gsm = GradSampleModuleFastGradientClippingFuse(model)
    gsm(x)
    captured = [(layer, capture) for layer, capture in zip(gsm.layers, gsm.step.captures) if capture is not None]
    plan = packed_grads.plan_packed_grads(captured, x.shape[0], x.device, lambda *_: method, vectors_only=vectors_only)
    names = {id(p): name for name, p in model.named_parameters()}
    return [(names[id(p)], dtype) for p, dtype in reservations], plan


@pytest.mark.parametrize("vectors_only", [False, True])
def test_plan_reserves_per_sample_layers_last_layer_first(monkeypatch, vectors_only):
    """Layers planned per sample: their parameters (only the vectors with ``vectors_only``), the last listed layer
    first (TwoHeads lists trunk, norm, head, unused), in the rules' per-sample dtype."""
    model = TwoHeads(use_second=True).double()
    reserved, plan = _planned(monkeypatch, model, "per_sample", vectors_only, torch.randn(3, 5, 6, dtype=torch.float64))
    order = ["unused.weight", "unused.bias", "head.weight", "head.bias", "norm.weight", "norm.bias", "trunk.weight",
             "trunk.bias"]
    expected = [name for name in order if not (vectors_only and name.endswith("weight") and name != "norm.weight")]
    assert reserved == [(name, torch.float64) for name in expected]
    assert isinstance(plan, PackedPerSampleGrads)


def test_plan_reserves_the_vectors_of_kernel_layers_in_the_accumulation_dtype(monkeypatch):
    """Layers planned for a norm kernel keep only their vector parameters (a Linear's bias beside its trainable
    weight), in float32 for float32 inputs; a LayerNorm planned so has none."""
    reserved, _ = _planned(monkeypatch, TwoHeads(use_second=True), "flash", False, torch.randn(3, 5, 6))
    assert reserved == [("unused.bias", torch.float32), ("head.bias", torch.float32), ("trunk.bias", torch.float32)]


def test_plan_is_none_without_anything_to_keep_and_skips_layers_used_twice(monkeypatch):
    """No vectors beside kernel-planned weights: no plan. A layer with two uses is counted on its own, never packed."""
    from tests.grad_sample.direct import Graph

    no_bias = Graph(lambda m, x: m["b"](torch.tanh(m["a"](x))).mean(dim=1),
                    a=nn.Linear(6, 6, bias=False), b=nn.Linear(6, 3, bias=False))
    reserved, plan = _planned(monkeypatch, no_bias, "flash", False, torch.randn(3, 5, 6))
    assert reserved == [] and plan is None
    twice = Graph(lambda m, x: m["b"](m["a"](torch.tanh(m["a"](x)))).mean(dim=1), a=nn.Linear(6, 6), b=nn.Linear(6, 3))
    reserved, _ = _planned(monkeypatch, twice, "per_sample", False, torch.randn(3, 5, 6))
    assert reserved == [("layers.b.weight", torch.float32), ("layers.b.bias", torch.float32)]
