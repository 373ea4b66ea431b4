"""The layers' hooks (flashnorm/grad_sample/hooks.py: LayerHooks): steps of one sample park the forward hooks and a
larger batch brings them back (each step exact against the float64 oracle), remove_hooks leaves the model without
FlashNorm's hooks, and outside a layer's forward its registrations hold the parameters themselves (aliases only while
it runs, also after a forward that raised)."""

from collections import UserDict

import pytest
import torch
import torch.nn as nn

from flashnorm.grad_sample import GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse
from tests.grad_sample.direct import CLIP, Graph, assert_clipped_sum, assert_norms, oracle_of, per_sample_loss
from tests.zoo import build

CLASSES = [GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse]


def _hooked_modules(model: nn.Module) -> list:
    """The submodules of ``model`` that carry any forward hook or forward pre-hook."""
    return [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]


def _exact_step(gsm, model, batch):
    """One clipped step on the first ``batch`` samples of a fixed float64 batch, against the oracle."""
    torch.manual_seed(1)
    x, y = torch.randn(3, 5, 6, dtype=torch.float64)[:batch], torch.randint(0, 4, (3,))[:batch]
    oracle = oracle_of(gsm, x, y)
    model.zero_grad(set_to_none=True)
    gsm.clipped_backward(per_sample_loss(gsm(x), y))
    assert_norms(gsm.get_norm_sample(), oracle)
    assert_clipped_sum(model, oracle)


def _float64(kind="layernorm"):
    model, _, _ = build(kind, 5)
    return model.double()


@pytest.mark.parametrize("cls", CLASSES)
def test_one_sample_steps_park_the_forward_hooks_and_a_larger_batch_restores_them(cls):
    model = _float64()
    gsm = cls(model, max_grad_norm=CLIP)
    layer_modules = [layer.module for layer in gsm.layers]
    assert set(_hooked_modules(model)) == set(layer_modules)
    _exact_step(gsm, model, 1)  # the first step of one sample still sees the layers' batch size
    assert not gsm.hooks.parked and set(_hooked_modules(model)) == set(layer_modules)
    for _ in range(2):
        _exact_step(gsm, model, 1)
        assert gsm.hooks.parked and _hooked_modules(model) == [], "B = 1 after B = 1: no forward hook runs"
        assert all(layer.handles == [] for layer in gsm.layers)
    _exact_step(gsm, model, 3)
    assert not gsm.hooks.parked and set(_hooked_modules(model)) == set(layer_modules)
    _exact_step(gsm, model, 1)
    assert not gsm.hooks.parked, "the step after a larger batch sees the batch size again"


class KeywordModel(nn.Module):
    """A model called with keyword arguments alone, as Hugging Face's ``model(**batch)``: its samples in a nested
    dict, and a shared [1, ...] tensor (position-like, broadcast over the batch) that may come first."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *, inputs, shift=None, scale=1.0):
        x = inputs["x"]
        return self.inner(x if shift is None else x + shift * scale)


def test_call_batch_size_of_keyword_calls():
    gsm = GradSampleModuleFastGradientClippingFuse(_float64(), max_grad_norm=CLIP)
    one, three, shared = torch.zeros(1, 5), torch.zeros(3, 5), torch.zeros(1, 5)
    size = gsm.hooks.call_batch_size
    assert size((three, shared), {}) == 3, "a positional call: the first input's"
    assert size((), {"inputs": {"x": three}, "mask": three, "use_cache": False, "n": 4, "dtype": torch.float64}) == 3
    assert size((), {"inputs": {"x": one}, "shift": shared}) == 1
    assert size((), {"inputs": UserDict(x=three), "pair": (three, [three])}) == 3, "any mapping, lists and tuples"
    assert size((), {"shift": shared, "inputs": {"x": three}}) is None, "a shared tensor of batch 1 beside 3 samples"
    assert size((), {"inputs": {"x": one}, "scalar": torch.tensor(2.0)}) is None, "a tensor without a batch dimension"
    assert size((), {"inputs": {"x": one}, "held": nn.Identity()}) is None, "an object that could hold tensors"
    assert size((), {"flag": True}) is None, "no tensor at all"


@pytest.mark.parametrize("cls", CLASSES)
def test_keyword_calls_of_one_sample_park_the_hooks_and_a_shared_tensor_does_not(cls):
    """``model(**batch)`` of one sample, twice: the second step takes the one-sample path (hooks parked), exact; a
    batch of 3 called with a shared [1, ...] tensor first is never taken for one sample (the whole batch would be
    clipped as one): hooks back, each sample clipped, exact."""
    inner = _float64()
    model = KeywordModel(inner)
    gsm = cls(model, max_grad_norm=CLIP)
    torch.manual_seed(1)
    x, y = torch.randn(3, 5, 6, dtype=torch.float64), torch.randint(0, 4, (3,))
    shift = torch.randn(1, 5, 6, dtype=torch.float64)
    for batch, parked in ((1, False), (1, True), (1, True), (3, False), (1, False), (1, True)):
        oracle = oracle_of(inner, x[:batch], y[:batch], forward=lambda m, xb: m(xb + shift * 0.5))
        model.zero_grad(set_to_none=True)
        gsm.clipped_backward(per_sample_loss(gsm(shift=shift, inputs={"x": x[:batch]}, scale=0.5), y[:batch]))
        assert gsm.hooks.parked == parked, (batch, parked)
        assert_norms(gsm.get_norm_sample(), oracle)
        assert_clipped_sum(inner, oracle)


@pytest.mark.parametrize("parked", [False, True])
@pytest.mark.parametrize("cls", CLASSES)
def test_remove_hooks_leaves_the_plain_model(cls, parked):
    """No FlashNorm hook on any module (parked or not), no step captured, the plain module's gradients; add_hooks
    brings the exact workflow back."""
    model = _float64()
    twin = _float64()
    twin.load_state_dict(model.state_dict())
    gsm = cls(model, max_grad_norm=CLIP)
    for batch in (1, 1) if parked else (3,):
        _exact_step(gsm, model, batch)
    assert gsm.hooks.parked == parked
    gsm.remove_hooks()
    assert _hooked_modules(model) == [] and not gsm.hooks.parked
    x, y = torch.randn(3, 5, 6, dtype=torch.float64), torch.randint(0, 4, (3,))
    model.zero_grad(set_to_none=True)
    per_sample_loss(gsm(x), y).sum().backward()
    assert gsm.step is None, "nothing captured"
    per_sample_loss(twin(x), y).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    gsm.add_hooks()
    _exact_step(gsm, model, 3)


class _Peek(nn.Linear):
    """A Linear that records what its registration holds while it runs."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def forward(self, x):
        self.seen.append(self.weight)
        return super().forward(x)


def _registered(model: nn.Module) -> dict:
    return dict(model.named_parameters())


@pytest.mark.parametrize("cls", CLASSES)
def test_registrations_hold_the_parameters_outside_a_layers_forward(cls):
    """Inside the layer its weight is read through an alias (another leaf on the same storage); before, between and
    after forwards, and after a forward whose layer raised (training or eval), the registrations hold the very
    parameters."""
    model = Graph(lambda m, x: m["head"](torch.tanh(m["peek"](x))).mean(dim=1), peek=_Peek(6, 6),
                  head=nn.Linear(6, 4)).double()
    params = _registered(model)
    gsm = cls(model, max_grad_norm=CLIP)

    def unchanged():
        got = _registered(model)
        return got.keys() == params.keys() and all(got[name] is p for name, p in params.items())

    peek = model.layers["peek"]
    assert unchanged()
    x, y = torch.randn(3, 5, 6, dtype=torch.float64), torch.randint(0, 4, (3,))
    loss = per_sample_loss(gsm(x), y)
    alias = peek.seen[-1]
    assert alias is not peek.weight and alias.data_ptr() == peek.weight.data_ptr()
    assert unchanged()
    gsm.clipped_backward(loss)
    assert unchanged() and peek.weight.grad is not None and alias.grad is None
    for training in (True, False):
        gsm.train(training)
        with pytest.raises(RuntimeError):
            gsm(torch.randn(3, 5, 7, dtype=torch.float64))  # the layer's own forward raises
        assert unchanged()


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_leading_batch_size_is_the_first_tensor_arguments(batch_first):
    gsm = GradSampleModuleFastGradientClipping(nn.Linear(2, 2), batch_first=batch_first)
    x = torch.zeros(3, 4, 2)
    assert gsm.hooks.leading_batch_size((x,)) == (3 if batch_first else 4)
    assert gsm.hooks.leading_batch_size((x[0, 0, 0],)) is None
    assert gsm.hooks.leading_batch_size(({"input": x},)) is None
    assert gsm.hooks.leading_batch_size(()) is None
