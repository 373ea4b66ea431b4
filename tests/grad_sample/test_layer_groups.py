"""Same-shaped layers counted and assembled as one (flashnorm/grad_sample/layer_groups.py): which layers are grouped,
the one-pass step's norms and clipped gradients against the float64 oracle (odd T, flash and Gram, frozen parameters,
a group the loss reaches only in part, GPT-2's Conv1D), and the rounding allowance unchanged by grouping."""

import pytest
import torch
import torch.nn as nn

from flashnorm.grad_sample import GradSampleModuleFastGradientClippingFuse, layer_groups
from flashnorm.norms.linear import LinearFamilyRule
from tests.grad_sample.direct import CLIP, wrap
from tests.oracle import microbatch_reference


class Tower(nn.Module):
    """``depth`` blocks x ↦ x + W₂ tanh(W₁ x) of one width (their W₁ alike, their W₂ alike), a LayerNorm and a head;
    ``skip`` names a block whose output the loss never reaches."""

    def __init__(self, width=6, hidden=10, depth=4, skip=None):
        super().__init__()
        self.up = nn.ModuleList(nn.Linear(width, hidden) for _ in range(depth))
        self.down = nn.ModuleList(nn.Linear(hidden, width) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 3)
        self.skip = skip

    def forward(self, x):
        for i, (up, down) in enumerate(zip(self.up, self.down)):
            update = down(torch.tanh(up(x)))
            x = x if i == self.skip else x + update
        return self.head(self.norm(x)).mean(dim=1)


def _sum_loss(out, target):
    return nn.functional.cross_entropy(out, target, reduction="sum")


@pytest.fixture
def grouped_calls(monkeypatch):
    """The layer names of every `clipped_grads_grouped` call of the Linear family, in call order."""
    calls = []
    grouped = LinearFamilyRule.clipped_grads_grouped

    def spy(self, layers, *args, **kwargs):
        calls.append(len(layers))
        return grouped(self, layers, *args, **kwargs)

    monkeypatch.setattr(LinearFamilyRule, "clipped_grads_grouped", spy)
    return calls


def _step(model, x, y, **kwargs):
    gsm, _, criterion = wrap(GradSampleModuleFastGradientClippingFuse, model, **kwargs)
    criterion(gsm(x), y).backward()
    return gsm


def _assert_exact(model, gsm, oracle):
    torch.testing.assert_close(gsm.get_norm_sample(), oracle.norms, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(grad, oracle.clipped_sum[name], rtol=1e-10, atol=1e-12, msg=name)
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("steps", [1, 37])
@pytest.mark.parametrize("method", ["flash", "gram"])
def test_same_shaped_layers_are_counted_and_assembled_as_groups_exactly(grouped_calls, method, steps):
    torch.manual_seed(0)
    model = Tower().double()
    x, y = torch.randn(5, steps, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    oracle = microbatch_reference(model, x, y, _sum_loss, CLIP)
    gsm = _step(model, x, y, norm_method=method)
    assert sorted(grouped_calls) == [4, 4], "the four W₁ and the four W₂ are each one group; the head is alone"
    assert (oracle.norms > CLIP).all(), "every sample is clipped: c_b matters everywhere"
    _assert_exact(model, gsm, oracle)


def test_layers_whose_trainable_parameters_differ_are_grouped_apart(grouped_calls):
    torch.manual_seed(1)
    model = Tower().double()
    model.up[1].bias.requires_grad_(False)
    model.down[2].weight.requires_grad_(False)
    x, y = torch.randn(4, 9, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    oracle = microbatch_reference(model, x, y, _sum_loss, CLIP)
    gsm = _step(model, x, y, norm_method="flash")
    assert sorted(grouped_calls) == [3, 3]
    _assert_exact(model, gsm, oracle)


def test_a_group_the_loss_reaches_in_part_counts_the_layers_it_reached(grouped_calls):
    torch.manual_seed(2)
    model = Tower(skip=1).double()
    x, y = torch.randn(4, 7, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    oracle = microbatch_reference(model, x, y, _sum_loss, CLIP)
    gsm = _step(model, x, y, norm_method="gram")
    assert sorted(grouped_calls) == [3, 3], "block 1 receives no gradient: its group is counted without it"
    _assert_exact(model, gsm, oracle)
    assert model.up[1].weight.grad is None or torch.count_nonzero(model.up[1].weight.grad) == 0


def test_an_empty_batch_writes_no_gradient(grouped_calls):
    model = Tower().double()
    gsm = _step(model, torch.randn(0, 5, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long), norm_method="flash")
    assert grouped_calls == []
    assert gsm.get_norm_sample().shape == (0,)
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_large_layers_are_counted_one_by_one(grouped_calls, monkeypatch):
    monkeypatch.setattr(layer_groups, "GROUP_MAX_ELEMENTS", 5 * 7 * (6 + 10) - 1)
    torch.manual_seed(3)
    model = Tower().double()
    x, y = torch.randn(5, 7, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    oracle = microbatch_reference(model, x, y, _sum_loss, CLIP)
    gsm = _step(model, x, y, norm_method="flash")
    assert grouped_calls == []
    _assert_exact(model, gsm, oracle)


@pytest.mark.parametrize("steps", [20, 37])  # the Gram form in float32 (its slack Q summed over a group), in float64
def test_grouping_changes_neither_the_norms_nor_the_rounding_allowance(monkeypatch, steps):
    """float32: the grouped step's ‖ĝ_b‖² and U_b equal the ungrouped step's (the same per-sample sums over the same
    rows, the allowance's radii added in quadrature alike), and so do the clipped gradients."""
    torch.manual_seed(4)
    x, y = torch.randn(6, steps, 6) * 30, torch.randint(0, 3, (6,))
    records, grads = [], []
    for limit in (layer_groups.GROUP_MAX_ELEMENTS, 0):
        monkeypatch.setattr(layer_groups, "GROUP_MAX_ELEMENTS", limit)
        torch.manual_seed(5)
        model = Tower()
        gsm = _step(model, x, y, norm_method="gram")
        records.append(gsm.last_norms)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    grouped, alone = records
    assert grouped.bound is not None
    torch.testing.assert_close(grouped.norm_sq, alone.norm_sq, rtol=1e-6, atol=0)
    torch.testing.assert_close(grouped.bound, alone.bound, rtol=1e-6, atol=0)
    # the allowance alone, R and Q's share of U_b, equal up to the float32 rounding of U_b itself
    excess = [(r.bound.double() - r.norm_sq.double().sqrt()) for r in records]
    assert (excess[1] > 0).all()
    ulp = float(torch.finfo(torch.float32).eps * alone.bound.max())
    torch.testing.assert_close(excess[0], excess[1], rtol=1e-3, atol=2 * ulp)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_gpt2_conv1d_layers_are_grouped_exactly(grouped_calls):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    config = transformers.GPT2Config(vocab_size=31, n_embd=8, n_layer=3, n_head=2, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=30, eos_token_id=30)
    model = transformers.GPT2LMHeadModel(config).double()
    ids = torch.randint(0, 31, (3, 11))

    def sample_loss(logits, target):
        return nn.functional.cross_entropy(logits[0], target[0], reduction="sum")

    class Logits(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    wrapped = Logits(model)
    oracle = microbatch_reference(wrapped, ids, ids, sample_loss, CLIP)
    gsm = GradSampleModuleFastGradientClippingFuse(wrapped, max_grad_norm=CLIP, norm_method="flash")
    logits = gsm(ids)
    gsm.clipped_backward(nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none").sum(dim=1))
    assert sorted(grouped_calls) == [3, 3, 3, 3], "c_attn, attn.c_proj, c_fc and mlp.c_proj, three of each"
    _assert_exact(wrapped, gsm, oracle)


class ConvPairs(nn.Module):
    """Three same-shaped 3×3 convolutions, and a 1×1 and a strided-dilated 3×3 one of the same input and output
    shapes (their patches differ: never in the 3×3s' group), then a head."""

    def __init__(self):
        super().__init__()
        self.same = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.pointwise = nn.Conv2d(4, 4, 1)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for conv in [*self.same, self.pointwise, self.dilated]:
            x = torch.tanh(conv(x))
        return self.head(x.mean(dim=(2, 3)))


def test_convolutions_group_only_with_the_same_patches(grouped_calls):
    torch.manual_seed(7)
    model = ConvPairs().double()
    x, y = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (3,))
    oracle = microbatch_reference(model, x, y, _sum_loss, CLIP)
    gsm = _step(model, x, y, norm_method="flash")
    assert sorted(grouped_calls) == [3], "the three 3×3 convolutions; the 1×1 and the dilated one alone"
    _assert_exact(model, gsm, oracle)


def test_no_group_on_cuda_where_float32_matmuls_may_use_tf32(monkeypatch):
    """The grouped assembly's float32 GEMM would round c ⊙ X to tf32: with allow_tf32 on, CUDA layers are counted
    one by one (the plan reads the flag; CPU captures stand in for CUDA ones)."""
    from flashnorm.grad_sample.capture import LayerCapture

    class Layer:
        def __init__(self, module):
            self.rule, self.module, self.shared, self.batch_first = LinearFamilyRule(), module, False, True

    class CudaLike(torch.Tensor):
        is_cuda = True

    x = torch.randn(2, 3, 6).as_subclass(CudaLike)
    captured = []
    for _ in range(3):
        capture = LayerCapture(xs=[x], gs=[None])
        capture.out_meta = ((2, 3, 4), torch.float32)
        captured.append((Layer(nn.Linear(6, 4)), capture))
    method_of = lambda layer, x, shape, dtype: "flash"  # noqa: E731
    monkeypatch.setattr(layer_groups, "tf32_enabled", lambda: False)
    assert len(layer_groups.plan_layer_groups(captured, method_of)) == 3
    monkeypatch.setattr(layer_groups, "tf32_enabled", lambda: True)
    assert layer_groups.plan_layer_groups(captured, method_of) == {}


class NormTower(nn.Module):
    """Four blocks x ↦ x + W tanh(N(x)) with a LayerNorm and then an RMSNorm each (the last LayerNorm with another
    ε, the third RMSNorm frozen); the per-sample method's layers."""

    def __init__(self, width=6, depth=4):
        super().__init__()
        self.ln = nn.ModuleList(nn.LayerNorm(width, eps=1e-5 if i < depth - 1 else 1e-3) for i in range(depth))
        self.rms = nn.ModuleList(nn.RMSNorm(width) for _ in range(depth))
        self.mix = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.rms[2].weight.requires_grad_(False)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for ln, rms, mix in zip(self.ln, self.rms, self.mix):
            x = x + mix(torch.tanh(rms(torch.tanh(ln(x)))))
        return self.head(x).mean(dim=1)


@pytest.mark.parametrize("steps", [1, 37])
def test_normalisation_layers_are_grouped_with_their_per_sample_gradients_exactly(monkeypatch, steps):
    from flashnorm.grad_sample.writers import KeptGroupGrads

    sizes = []
    clipped = KeptGroupGrads.clipped_grads
    monkeypatch.setattr(KeptGroupGrads, "clipped_grads",
                        lambda self, *a, **k: sizes.append(len(self.layers)) or clipped(self, *a, **k))
    torch.manual_seed(8)
    model = NormTower().double()
    with torch.no_grad():  # weights and biases away from their initial 1 and 0
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(5, steps, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    oracle = microbatch_reference(model, x, y, _sum_loss, CLIP)
    gsm = _step(model, x, y)
    assert sorted(sizes) == [3, 3], "three LayerNorms of one ε, three trainable RMSNorms; the rest alone"
    _assert_exact(model, gsm, oracle)


def test_the_groups_are_planned_once_per_capture_signature(grouped_calls, monkeypatch):
    """A second step of the same shapes reuses the memberships (no planning), with fresh groups; a new batch size
    plans again; unfreezing a layer rebuilds the hooked model, whose plans start empty, and regroups it apart."""
    planned = []
    memberships = layer_groups._memberships
    monkeypatch.setattr(layer_groups, "_memberships", lambda *a: planned.append(1) or memberships(*a))
    torch.manual_seed(9)
    model = Tower().double()
    gsm, _, criterion = wrap(GradSampleModuleFastGradientClippingFuse, model, norm_method="flash")
    for batch in (4, 4, 5):
        x, y = torch.randn(batch, 7, 6, dtype=torch.float64), torch.randint(0, 3, (batch,))
        oracle = microbatch_reference(model, x, y, _sum_loss, CLIP)
        for p in model.parameters():
            p.grad = None
        criterion(gsm(x), y).backward()
        _assert_exact(model, gsm, oracle)
    assert len(planned) == 2 and sorted(grouped_calls) == [4] * 6
    model.up[0].bias.requires_grad_(False)
    x, y = torch.randn(4, 7, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    oracle = microbatch_reference(model, x, y, _sum_loss, CLIP)
    for p in model.parameters():
        p.grad = None
    criterion(gsm(x), y).backward()
    assert len(planned) == 3 and sorted(grouped_calls[6:]) == [3, 4]
    _assert_exact(model, gsm, oracle)
