"""The clipped-gradient writers (flashnorm/grad_sample/writers.py): each mode row's writer and its flags as the modes
table gives them; SecondBackward and AssembleFromKept passed as ``writer=`` give the float64 oracle's clipped sum; a
writer subclass is the extension point the module uses (bind, keep, write); the kept records on their own."""

import pytest
import torch
import torch.nn as nn

from flashnorm import get_mode, valid_mode_names
from flashnorm.grad_sample import (
    AssembleFromKept,
    ClippedGradientWriter,
    FlashNormGradSampleModule,
    ReduceScatterAssembly,
    SecondBackward,
)
from flashnorm.grad_sample.writers import KeptInputs, KeptPacked, KeptPerSample
from flashnorm.norms import get_norm_rule
from tests.grad_sample.direct import CLIP, Graph, assert_clipped_sum, assert_norms, oracle_of, per_sample_loss

#: The modes table (flashnorm/modes.py): every FlashNorm mode, aliases included, and its writer.
WRITER_OF = {
    "ghost": SecondBackward,
    "flash": SecondBackward,
    "flash_fuse": AssembleFromKept,
    "flash_bk": AssembleFromKept,
    "ghost_fsdp": SecondBackward,
    "flash_fsdp": SecondBackward,
    "flash_fuse_fsdp": ReduceScatterAssembly,
}
#: writer → (backward_passes, retains_graph, applies_kept_per_sample)
FLAGS = {SecondBackward: (2, True, False), AssembleFromKept: (1, False, True), ReduceScatterAssembly: (1, False, True)}


@pytest.mark.parametrize("name", valid_mode_names())
def test_each_mode_row_names_its_writer_with_its_flags(name):
    mode = get_mode(name)
    if mode.delegated:
        assert name not in WRITER_OF and mode.writer is None and mode.passes is None
        return
    writer = mode.writer
    assert writer is WRITER_OF[name] and issubclass(writer, ClippedGradientWriter)
    assert (writer.backward_passes, writer.retains_graph, writer.applies_kept_per_sample) == FLAGS[writer]
    assert mode.passes == FLAGS[writer][0]


def test_the_table_has_no_other_flashnorm_mode():
    assert {name for name in valid_mode_names() if not get_mode(name).delegated} == set(WRITER_OF)


VOCAB = 11


def _token_model():
    """Embedding → Linear → LayerNorm → tanh → Linear head, mean over T (float64)."""
    torch.manual_seed(0)
    return Graph(lambda m, ids: m["head"](torch.tanh(m["norm"](m["lin"](m["emb"](ids))))).mean(dim=1),
                 emb=nn.Embedding(VOCAB, 6), lin=nn.Linear(6, 5), norm=nn.LayerNorm(5), head=nn.Linear(5, 3)).double()


def _tokens(batch=4, steps=7):
    return torch.randint(0, VOCAB, (batch, steps)), torch.randint(0, 3, (batch,))


@pytest.mark.parametrize("method", [None, "flash", "gram", "per_sample"])
@pytest.mark.parametrize("writer", [SecondBackward, AssembleFromKept])
def test_an_explicit_writer_gives_the_oracle_clipped_sum(writer, method):
    """FlashNormGradSampleModule(writer=...) on Linear + LayerNorm + Embedding: the oracle's norms and clipped sum.
    (Parameters with hooks of their own are refused by the DP step, so no hook counts the accumulations here.)"""
    model = _token_model()
    ids, y = _tokens()
    oracle = oracle_of(model, ids, y)
    gsm = FlashNormGradSampleModule(model, max_grad_norm=CLIP, writer=writer(), norm_method=method)
    assert type(gsm.config.writer) is writer
    gsm.clipped_backward(per_sample_loss(gsm(ids), y))
    assert_norms(gsm.get_norm_sample(), oracle)
    assert_clipped_sum(model, oracle)


class _Recorded(AssembleFromKept):
    """Records each call of the protocol, then does what AssembleFromKept does."""

    def __init__(self):
        super().__init__()
        self.bound, self.kept, self.writes = [], [], 0

    def bind(self, layers):
        self.bound.append([layer.name for layer in layers])

    def keep(self, kept_by_layer, layer, kept):
        self.kept.append(layer.name)
        super().keep(kept_by_layer, layer, kept)

    def write(self, step, loss_per_sample, coef, backend):
        self.writes += 1
        super().write(step, loss_per_sample, coef, backend)


def test_a_writer_subclass_is_what_the_module_calls():
    """The extension point: bound to the hooked layers (again when they are rediscovered), handed what the norm pass
    counted of each layer, called once per step; its gradients are the oracle's."""
    model = _token_model()
    ids, y = _tokens()
    writer = _Recorded()
    gsm = FlashNormGradSampleModule(model, max_grad_norm=CLIP, writer=writer)
    names = ["layers.emb", "layers.lin", "layers.norm", "layers.head"]
    assert writer.bound == [names] and [layer.name for layer in gsm.layers] == names
    for step in range(2):
        oracle = oracle_of(gsm, ids, y)
        writer.kept.clear()
        gsm.clipped_backward(per_sample_loss(gsm(ids), y))
        assert writer.writes == step + 1 and sorted(writer.kept) == sorted(names)
        assert_clipped_sum(model, oracle)
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(p.grad)
                p.grad = None
    model.layers["emb"].weight.requires_grad_(False)
    gsm.clipped_backward(per_sample_loss(gsm(ids), y))
    assert writer.bound[-1] == names[1:] and writer.writes == 3


def test_a_writer_without_write_refuses_and_leaves_no_gradient():
    """ClippedGradientWriter.write is the one method a writer must define; until it does, the step raises before any
    gradient is left (and the base class keeps nothing for it)."""

    class Unfinished(ClippedGradientWriter):
        pass

    model = _token_model()
    ids, y = _tokens()
    gsm = FlashNormGradSampleModule(model, max_grad_norm=CLIP, writer=Unfinished())
    with pytest.raises(NotImplementedError):
        gsm.clipped_backward(per_sample_loss(gsm(ids), y))
    assert all(p.grad is None for p in model.parameters())


# -- the kept records ---------------------------------------------------------------------------------------------
def test_kept_records_give_the_float64_clipped_sums():
    """KeptPerSample: Σ_b c_b g_b of its per-sample gradients; KeptPacked: nothing (the packed buffers hold it);
    KeptInputs: the rule's (c ⊙ G)ᵀX, with or without the bias."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    rule = get_norm_rule(layer)
    x, g = torch.randn(5, 7, 4, dtype=torch.float64), torch.randn(5, 7, 3, dtype=torch.float64)
    coef = torch.rand(5, dtype=torch.float64)
    per_sample = {layer.weight: torch.einsum("btp,btd->bpd", g, x), layer.bias: g.sum(dim=1)}
    expected = {p: sum(coef[b] * gs[b] for b in range(5)) for p, gs in per_sample.items()}
    for kept, params in ((KeptPerSample(per_sample), [layer.weight, layer.bias]),
                         (KeptInputs("flash", x, g, True), [layer.weight, layer.bias]),
                         (KeptInputs("flash", x, g, False), [layer.weight]),
                         (KeptPacked(), [])):
        got = kept.clipped_grads(rule, layer, coef, "torch")
        assert list(got) == params, type(kept).__name__
        for p in params:
            torch.testing.assert_close(got[p], expected[p], rtol=1e-10, atol=1e-12)
