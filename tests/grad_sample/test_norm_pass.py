"""A step's norm terms (flashnorm/grad_sample/norm_pass.py: NormTerms) through the module, float64, against the
oracle's norms and clipped sums: layers used once, a layer used twice (uses joined where the rule can, per-sample
gradients summed where it cannot), weights tied between two layers (the cross term), and outputs or uses that do not
reach the loss (they contribute nothing)."""

import pytest
import torch
import torch.nn as nn

from flashnorm.grad_sample import GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse
from tests.grad_sample.direct import CLIP, Graph, assert_clipped_sum, assert_norms, oracle_of, per_sample_loss
from tests.zoo import Scale

D, VOCAB, BATCH, STEPS = 6, 11, 4, 6


def _features():
    return torch.randn(BATCH, STEPS, D, dtype=torch.float64)


def _channels_first():
    return torch.randn(BATCH, D, STEPS, dtype=torch.float64)


def _ids():
    return torch.randint(0, VOCAB, (BATCH, STEPS))


def _pairs_norm(norm, h):
    """A LayerNorm over (2, D) on consecutive pairs of positions: its uses cannot be joined along the sequence."""
    return norm(h.view(h.shape[0], -1, 2, D)).view(h.shape)


def _tied(a, b):
    b.weight = a.weight
    return b


def _headed(body, head=None, **layers):
    """A model x → head(body(layers, x)) averaged over positions; ``head``: ``Linear(D, 3)`` unless given."""
    return Graph(lambda m, x: m["head"](body(m, x)).mean(dim=1), **layers, head=head or nn.Linear(D, 3))


def _linear():
    return nn.Linear(D, D)


#: scenario → (model, input).
SCENARIOS = {
    "once": (lambda: _headed(lambda m, ids: torch.tanh(m["norm"](m["lin"](m["emb"](ids)))),
                             emb=nn.Embedding(VOCAB, D), lin=_linear(), norm=nn.LayerNorm(D)), _ids),
    "linear_twice": (lambda: _headed(lambda m, x: m["a"](torch.tanh(m["a"](x))), a=_linear()), _features),
    "embedding_twice": (lambda: _headed(lambda m, ids: torch.tanh(m["emb"](ids) * m["emb"](ids.flip(1))),
                                        emb=nn.Embedding(VOCAB, D)), _ids),
    "layernorm_twice": (lambda: _headed(lambda m, x: m["norm"](torch.tanh(m["norm"](x)) * x), norm=nn.LayerNorm(D)),
                        _features),
    "pair_norm_twice": (lambda: _headed(lambda m, x: _pairs_norm(m["norm"], torch.tanh(_pairs_norm(m["norm"], x))),
                                        norm=nn.LayerNorm((2, D))), _features),
    "conv_twice": (lambda: _headed(lambda m, x: m["conv"](torch.tanh(m["conv"](x))).transpose(1, 2),
                                   conv=nn.Conv1d(D, D, 3, padding=1)), _channels_first),
    "fallback_twice": (lambda: _headed(lambda m, x: m["scale"](torch.tanh(m["scale"](x))), scale=Scale(D)), _features),
    "tied_linears": (lambda: _headed(lambda m, x: m["b"](torch.tanh(m["a"](x))), a=(a := _linear()),
                                     b=_tied(a, _linear())), _features),
    "tied_embedding_head": (lambda: _headed(lambda m, ids: torch.tanh(m["mix"](m["emb"](ids))), emb=(e := nn.Embedding(
        VOCAB, D)), mix=_linear(), head=_tied(e, nn.Linear(D, VOCAB, bias=False))), _ids),
    "unreached_layer": (lambda: _headed(lambda m, x: (m["side"](x), torch.tanh(m["a"](x)))[1], a=_linear(),
                                        side=_linear()), _features),
    "unreached_use": (lambda: _headed(lambda m, x: (m["a"](x.flip(1)), torch.tanh(m["a"](x)))[1], a=_linear()),
                      _features),
    "tied_unreached": (lambda: _headed(lambda m, x: (m["b"](x), torch.tanh(m["a"](x)))[1], a=(a := _linear()),
                                       b=_tied(a, _linear())), _features),
}


@pytest.mark.parametrize("method", [None, "flash", "gram", "per_sample"])
@pytest.mark.parametrize("cls", [GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_norms_and_clipped_sums_are_the_oracles(scenario, cls, method):
    torch.manual_seed(0)
    build, inputs = SCENARIOS[scenario]
    model = build().double()
    x, y = inputs(), torch.randint(0, 3, (BATCH,))
    oracle = oracle_of(model, x, y)
    assert (oracle.norms > CLIP).all(), "every sample is clipped: the norms decide the step"
    gsm = cls(model, max_grad_norm=CLIP, norm_method=method)
    gsm.clipped_backward(per_sample_loss(gsm(x), y))
    assert_norms(gsm.get_norm_sample(), oracle)
    assert_clipped_sum(model, oracle)

