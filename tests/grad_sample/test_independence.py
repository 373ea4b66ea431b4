"""Samples stay independent, or the model is refused (`flashnorm.grad_sample.independence`).

Written as an attacker would: layers that mix samples or write their state from the batch (a BatchNorm with no
trainable parameter in training mode, one switched to training after ``make_private``, ``Embedding(max_norm)``,
``scale_grad_by_freq``) are refused, naming the layer and the fix, with θ (and the buffers) unchanged; parameter-free
mixing (``x - x.mean(0)``, a softmax over the batch, a buffer written from the batch) is caught by the probe at the
first step, θ unchanged. What stays independent (BatchNorm in eval mode, InstanceNorm without running statistics,
dropout) runs exactly, and the probe leaves the random-number stream as it was.
"""

import pytest
import torch
import torch.nn as nn

from flashnorm.grad_sample.independence import SampleMixingError, register_harmless_buffer, _HARMLESS_BUFFERS
from tests.grad_sample.guarantee import (
    MODES, Attempt, adversarial, assert_unchanged, batch, influence, make_private, one_step, oracle, probe, run,
    snapshot, step,
)

C = 1.0


def _image_batch(n=4):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 2, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    x[-1] *= 10
    g[-1] *= 1e3
    return (x, g), (x[:-1], g[:-1])


def _norm_model(norm):
    """[B, 2, 6] → Conv1d → norm → flatten → Linear → [B, 3]."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3), norm, nn.Flatten(), nn.Linear(16, 3)).double()


def _frozen(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


REFUSED_AT_WRAP = {
    "batchnorm_affine_false": lambda: _norm_model(nn.BatchNorm1d(4, affine=False)),
    "batchnorm_frozen": lambda: _norm_model(_frozen(nn.BatchNorm1d(4))),
    "batchnorm_no_running_stats_eval": lambda: _norm_model(nn.BatchNorm1d(4, affine=False, track_running_stats=False)).eval(),
    "syncbatchnorm_frozen": lambda: _norm_model(_frozen(nn.SyncBatchNorm(4))),
    "instancenorm_running_stats": lambda: _norm_model(nn.InstanceNorm1d(4, track_running_stats=True)),
}


@pytest.mark.parametrize("case", REFUSED_AT_WRAP)
@pytest.mark.parametrize("mode", MODES)
def test_layers_that_mix_samples_are_refused_at_make_private(mode, case):
    """The message names the layer's path and the fix; the model is left unwrapped."""
    model = REFUSED_AT_WRAP[case]()
    if case == "batchnorm_no_running_stats_eval":
        model.train()  # the wrapper trains; the layer uses batch statistics in every mode
        model[1].eval()
    before = snapshot(model)
    with pytest.raises(SampleMixingError, match=r"Layer '1' \((Sync)?(BatchNorm1d|InstanceNorm1d|BatchNorm)\).*Fix: "):
        make_private(model, mode, clip=C)
    assert_unchanged(model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), "the model was wrapped"


@pytest.mark.parametrize("mode", MODES)
def test_a_batchnorm_fix_is_named(mode):
    with pytest.raises(SampleMixingError, match=r"GroupNorm.*ModuleValidator\.fix"):
        make_private(_norm_model(nn.BatchNorm1d(4, affine=False)), mode, clip=C)


@pytest.mark.parametrize("how", ("model_train", "layer_train"))
@pytest.mark.parametrize("mode", MODES)
def test_a_batchnorm_in_eval_mode_is_exact_and_one_switched_to_train_is_refused_at_the_step(mode, how):
    """Accepted in eval mode (a fixed per-sample affine map: the oracle's step exactly). Switched to training after
    make_private, the step's forward refuses before anything runs: θ and the running statistics unchanged."""
    def make(b):
        x, g = b
        model = _norm_model(nn.BatchNorm1d(4, affine=False))
        model[1].running_mean.uniform_(-1, 1)
        model[1].eval()
        private = make_private(model, mode, clip=C)
        return Attempt(model, lambda: step(private, x, g), expected=oracle(private.model, x, g, C))

    assert influence(make, _image_batch(), C) <= C * (1 + 1e-3)
    model = _norm_model(nn.BatchNorm1d(4, affine=False))
    model[1].eval()
    private = make_private(model, mode, clip=C)
    (x, g), _ = _image_batch()
    step(private, x, g)
    private.optimizer.zero_grad()
    if how == "model_train":
        private.model.train()
    else:
        model[1].train()
    stats = model[1].running_mean.clone()
    assert run(Attempt(model, lambda: step(private, x, g)), r"Layer '1' \(BatchNorm1d\) is in training mode") is None
    assert torch.equal(model[1].running_mean, stats)


@pytest.mark.parametrize("mode", MODES)
def test_instance_norm_without_running_stats_is_exact(mode):
    def make(b):
        x, g = b
        model = _norm_model(nn.InstanceNorm1d(4, affine=True))
        private = make_private(model, mode, clip=C)
        return Attempt(model, lambda: step(private, x, g), expected=oracle(private.model, x, g, C))

    assert influence(make, _image_batch(), C) <= C * (1 + 1e-3)


class Tokens(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 3, **kwargs)
        self.head = nn.Linear(3, 3)

    def forward(self, ids):
        return self.head(self.emb(ids))


def _tokens(n=4):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 10, (n, 5), generator=gen)
    g = torch.randn(n, 5, 3, generator=gen, dtype=torch.float64)
    return ids, g


@pytest.mark.parametrize("option", ({"max_norm": 0.1}, {"scale_grad_by_freq": True}))
@pytest.mark.parametrize("mode", MODES)
def test_embedding_max_norm_and_scale_grad_by_freq_are_refused_at_make_private(mode, option):
    model = Tokens(**option).double()
    with pytest.raises(SampleMixingError, match=rf"Layer 'emb' \(Embedding\).*Fix: pass {next(iter(option))}="):
        make_private(model, mode, clip=C)


@pytest.mark.parametrize("train", (True, False))
@pytest.mark.parametrize("mode", MODES)
def test_embedding_max_norm_set_after_make_private_is_refused_at_every_forward(mode, train):
    """The renormalisation writes the weight in eval mode too: the forward itself is refused, θ unchanged."""
    model = Tokens().double()
    private = make_private(model, mode, clip=C)
    ids, g = _tokens()
    step(private, ids, g)
    private.optimizer.zero_grad()
    model.emb.max_norm = 0.1
    private.model.train(train)
    before = snapshot(model)
    with pytest.raises(SampleMixingError, match=r"Layer 'emb' \(Embedding\) has max_norm=0.1.*max_norm=None"):
        with torch.no_grad():
            private.model(ids)
    assert_unchanged(model, before)
    if train:
        assert run(Attempt(model, lambda: step(private, ids, g)), "max_norm") is None


class Centred(nn.Module):
    """Parameter-free mixing between two Linear layers: ``how`` picks the relative of ``x - x.mean(0)``."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.how = nn.Linear(4, 5), nn.Linear(5, 3), how
        self.register_buffer("seen", torch.zeros(5))

    def forward(self, x):
        h = self.a(x)
        if self.how == "centre":
            h = h - h.mean(0, keepdim=True)
        elif self.how == "softmax_over_batch":
            h = h.softmax(dim=0)
        elif self.how == "batch_max":
            h = h - h.amax(dim=0, keepdim=True)
        elif self.how == "standardise":
            h = (h - h.mean(0)) / (h.std(0) + 1e-5)
        elif self.how == "buffer":
            with torch.no_grad():
                self.seen += h.detach().sum((0, 1)) if self.training else 0
        elif self.how == "param_write":
            with torch.no_grad():
                self.a.weight.mul_(1.0)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("how", ("centre", "softmax_over_batch", "batch_max", "standardise"))
@pytest.mark.parametrize("mode", MODES)
def test_the_probe_refuses_parameter_free_mixing_at_the_first_step(mode, how):
    make = one_step(lambda: Centred(how).double(), mode, clip=C)
    assert influence(make, adversarial(), C, refusal=r"mixes samples.*sample-independence probe") is None


@pytest.mark.parametrize("how", ("buffer", "param_write"))
@pytest.mark.parametrize("mode", MODES)
def test_the_probe_refuses_a_forward_that_writes_state(mode, how):
    make = one_step(lambda: Centred(how).double(), mode, clip=C)
    pattern = "writes buffer 'seen' from the batch" if how == "buffer" else "writes parameter 'a.weight' in place"
    assert influence(make, adversarial(), C, refusal=pattern) is None


def test_a_buffer_registered_as_harmless_is_accepted():
    register_harmless_buffer(Centred, "seen")
    try:
        (x, g), _ = adversarial()
        model = Centred("buffer").double()
        private = make_private(model, MODES[0], clip=C)
        step(private, x, g)
    finally:
        _HARMLESS_BUFFERS.discard((Centred, "seen"))


@pytest.mark.parametrize("mode", MODES)
def test_the_probe_runs_once_at_the_first_batch_of_two_or_more(mode):
    model = probe()
    private = make_private(model, mode, clip=C)
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    x, g = batch(1, seed=3)
    step(private, x, g)
    private.optimizer.zero_grad()
    assert len(calls) == 1 and private.model.probe_pending
    x, g = batch(4, seed=3)
    for expected in (3, 4):
        step(private, x, g)
        private.optimizer.zero_grad()
        assert len(calls) == expected and not private.model.probe_pending


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.drop, self.b = nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


@pytest.mark.parametrize("mode", MODES)
def test_the_probe_sees_dropout_as_independent_and_leaves_the_random_stream_as_it_was(mode):
    """Dropout draws the same masks in the probe and the real forward (no false refusal); the step and the next
    random draw are those of a run without the probe."""
    (x, g), _ = adversarial()
    results = []
    for probed in (True, False):
        model = Dropped().double()
        private = make_private(model, mode, clip=C)
        private.model.probe_pending = probed
        torch.manual_seed(11)
        step(private, x, g)
        results.append((snapshot(model), torch.rand(3)))
    (first, draw1), (second, draw2) = results
    assert torch.equal(draw1, draw2)
    for name in first:
        assert torch.equal(first[name], second[name]), name


class SeqFirstCentred(nn.Module):
    """[T, B, 4] → Linear → (centred over the batch dimension 1 when ``mix``) → mean over T → [B, 3]."""

    def __init__(self, mix):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.mix = nn.Linear(4, 3), nn.Linear(3, 3), mix

    def forward(self, x):
        h = self.a(x)
        if self.mix:
            h = h - h.mean(1, keepdim=True)
        return self.b(torch.tanh(h)).mean(0)


@pytest.mark.parametrize("mix", (True, False))
@pytest.mark.parametrize("mode", MODES)
def test_the_probe_in_a_sequence_first_model_with_batch_first_outputs(mode, mix):
    """batch_first=False: inputs [T, B, ...], outputs [B, ...] (B = 3 = the output width, so the batch dimension is
    ambiguous): mixing over the batch is refused, the independent model steps."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    model = SeqFirstCentred(mix).double()
    private = make_private(model, mode, clip=C, batch_first=False)
    refusal = r"mixes samples" if mix else r"$^"
    assert (run(Attempt(model, lambda: step(private, x, g)), refusal) is None) == mix


class KeywordCentred(Centred):
    def forward(self, *, inputs):
        return super().forward(inputs)


@pytest.mark.parametrize("mode", MODES)
def test_the_probe_runs_on_a_forward_called_with_keyword_arguments_only(mode):
    """``model(**batch)``, as Hugging Face's Trainer calls it."""
    (x, g), _ = adversarial()
    model = KeywordCentred("centre").double()
    private = make_private(model, mode, clip=C)
    before = snapshot(model)
    with pytest.raises(SampleMixingError, match="mixes samples"):
        private.criterion(private.model(inputs=x), g).backward()
    assert_unchanged(model, before)
