"""One clipping step (flashnorm/grad_sample/step.py): the StepState machine as its docstring draws it,

    CAPTURED ──clipped_backward──▶ NORM_PASS ──▶ COEFFICIENTS ──▶ WRITING ──▶ (dropped)
        └──a plain loss.backward() reaches the taps──▶ PLAIN_BACKWARD
    a failed check ──▶ ABANDONED

each state's norms and gradients against the float64 oracle, ClippingStep.inputs_of, and NormRecord."""

import pytest
import torch

from flashnorm.grad_sample import (
    AssembleFromKept,
    GradSampleModuleFastGradientClipping,
    GradSampleModuleFastGradientClippingFuse,
    NormRecord,
    SecondBackward,
    StepState,
)
from flashnorm.norms.rounding import ALLOWANCE
from tests.grad_sample.direct import CLIP, Graph, assert_clipped_sum, assert_norms, oracle_of, per_sample_loss
from tests.zoo import build

CLASSES = [GradSampleModuleFastGradientClipping, GradSampleModuleFastGradientClippingFuse]


def _float64(cls, **kwargs):
    """(model, x, y, its oracle, ``cls(model)``) of Linear → LayerNorm → tanh → mean → Linear head (B = 3, T = 5)."""
    model, x, y = build("layernorm", 5)
    model, x = model.double(), x.double()
    return model, x, y, oracle_of(model, x, y), cls(model, max_grad_norm=CLIP, **kwargs)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_training_forward_captures_and_the_norm_pass_leaves_coefficients(cls):
    model, x, y, oracle, gsm = _float64(cls)
    assert gsm.step is None
    loss = per_sample_loss(gsm(x), y)
    step = gsm.step
    assert step.state is StepState.CAPTURED and step.batch_size == 3
    coef = gsm.compute_clipping_coef(loss)
    assert gsm.step is step and step.state is StepState.COEFFICIENTS
    assert all(p.grad is None for p in model.parameters()), "the norm pass writes no gradient"
    assert_norms(step.norms.norms(), oracle)
    assert (oracle.norms > CLIP).all(), "every sample is clipped: the coefficients depend on the norms"
    torch.testing.assert_close(coef, (CLIP / (oracle.norms + 1e-6)).clamp(max=1.0), rtol=1e-10, atol=1e-12)
    gsm.write_clipped_gradients(loss, coef)
    assert gsm.step is None, "the written step is dropped"
    assert_clipped_sum(model, oracle)
    with pytest.raises(RuntimeError, match="No captured forward pass"):
        gsm.clipped_backward(loss)  # a forward's loss is back-propagated once


class _StateLog:
    """Writer mixin: the state of the module's step each time the norm pass hands the writer a counted layer, and
    when the writer is called."""

    def __init__(self, gsm_of):
        super().__init__()
        self.gsm_of, self.states = gsm_of, []

    def keep(self, kept_by_layer, layer, kept):
        self.states.append(self.gsm_of().step.state)
        super().keep(kept_by_layer, layer, kept)

    def write(self, step, loss_per_sample, coef, backend):
        self.states.append(step.state)
        super().write(step, loss_per_sample, coef, backend)


@pytest.mark.parametrize("writer", [SecondBackward, AssembleFromKept])
def test_clipped_backward_walks_norm_pass_then_writing_then_drops_the_step(writer):
    holder = []
    log = type("Logged", (_StateLog, writer), {})(lambda: holder[0])
    model, x, y, oracle, gsm = _float64(GradSampleModuleFastGradientClipping, writer=log)
    holder.append(gsm)
    gsm.clipped_backward(per_sample_loss(gsm(x), y))
    assert log.states == [StepState.NORM_PASS] * len(gsm.layers) + [StepState.WRITING]
    assert gsm.step is None
    assert_norms(gsm.get_norm_sample(), oracle)
    assert_clipped_sum(model, oracle)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_plain_backward_gives_plain_backward_with_the_oracle_norms_on_request(cls):
    """``loss_per_sample.mean().backward()`` (the module's ``mean`` reduction) reaches the taps: the step records it,
    the gradients are the unclipped mean, the norms are computed when asked for, as Opacus defines them (‖∇ℓ_b‖),
    and the step's loss cannot then go through the workflow."""
    model, x, y, oracle, gsm = _float64(cls)
    loss = per_sample_loss(gsm(x), y)
    loss.mean().backward()
    assert gsm.step.state is StepState.PLAIN_BACKWARD
    for p in model.parameters():
        p.grad.mul_(len(x))  # the mean's gradient is the sum's over B
    assert_clipped_sum(model, oracle_of(gsm, x, y, clip=float("inf")))
    assert_norms(gsm.get_norm_sample(), oracle)
    with pytest.raises(RuntimeError, match="already back-propagated by a backward other than the DP loss"):
        gsm.clipped_backward(loss)


@pytest.mark.parametrize("bad", [lambda loss: loss.unsqueeze(0), lambda loss: loss[:2], lambda loss: loss.sum()],
                         ids=["[1, B]", "[B - 1]", "scalar"])
@pytest.mark.parametrize("cls", CLASSES)
def test_a_wrong_shaped_loss_abandons_the_step(cls, bad):
    model, x, y, _, gsm = _float64(cls)
    loss = per_sample_loss(gsm(x), y)
    with pytest.raises(ValueError, match="one value per sample"):
        gsm.clipped_backward(bad(loss))
    assert gsm.step.state is StepState.ABANDONED
    assert all(gsm.step.inputs_of(layer) == [] for layer in gsm.layers), "its captures are dropped"
    with pytest.raises(RuntimeError, match="No captured forward pass"):
        gsm.clipped_backward(loss)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cls", CLASSES)
def test_a_gradient_from_an_older_forward_in_the_norm_pass_raises(cls):
    model, x, y, _, gsm = _float64(cls)
    older = per_sample_loss(gsm(x), y)
    gsm(x)
    with pytest.raises(RuntimeError, match="forward pass other than the model's last one"):
        gsm.clipped_backward(older)
    assert all(p.grad is None for p in model.parameters()), "nothing written"


@pytest.mark.parametrize("cls", CLASSES)
def test_inputs_of_gives_each_use_batch_first_until_the_norm_pass_counts_it(cls):
    """A sequence-first model ([T, B, d]) whose Linear ``a`` runs twice: two inputs, batch first, in forward order; the
    norm pass takes them (and its norms are the oracle's)."""
    model = Graph(lambda m, x: m["head"](m["a"](torch.tanh(m["a"](x)))).mean(dim=0),
                  a=torch.nn.Linear(4, 4), head=torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    oracle = oracle_of(model, x.transpose(0, 1), y, forward=lambda m, sample: m(sample.transpose(0, 1)))
    gsm = cls(model, max_grad_norm=CLIP, batch_first=False)
    loss = per_sample_loss(gsm(x), y)
    a, head = (next(layer for layer in gsm.layers if layer.module is model.layers[name]) for name in ("a", "head"))
    uses = gsm.step.inputs_of(a)
    assert len(uses) == 2
    assert torch.equal(uses[0], x.transpose(0, 1))
    assert torch.equal(uses[1], torch.tanh(model.layers["a"](x)).detach().transpose(0, 1))
    assert len(gsm.step.inputs_of(head)) == 1 and gsm.step.inputs_of(head)[0].shape == (3, 5, 4)
    gsm.compute_clipping_coef(loss)
    assert gsm.step.inputs_of(a) == [] and gsm.step.inputs_of(head) == []
    assert_norms(gsm.get_norm_sample(), oracle)


def test_norm_record_norms_and_clipping_coefficients():
    """‖g_b‖ = √max(0, ‖ĝ_b‖²); c_b = min(1, C/(‖g_b‖ + 10⁻⁶)) without a bound, and also ≤ (1 + τ)·C/U_b with one
    (τ = 10⁻³)."""
    assert ALLOWANCE == 1e-3
    norm_sq = torch.tensor([4.0, 0.25, -1e-9, 0.0], dtype=torch.float64)
    bound = torch.tensor([2.0, 4.0, 1e3, 0.5], dtype=torch.float64)
    record, bounded = NormRecord(norm_sq), NormRecord(norm_sq, bound)
    assert torch.equal(record.norms(), torch.tensor([2.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(bounded.norms(), record.norms()), "the bound changes the coefficient, not the norm"
    for clip, unbounded, with_bound in (
        (1.0, [1 / (2 + 1e-6), 1.0, 1.0, 1.0], [1 / (2 + 1e-6), 1.001 / 4, 1.001e-3, 1.0]),
        (0.1, [0.1 / (2 + 1e-6), 0.1 / (0.5 + 1e-6), 1.0, 1.0], [0.1 / (2 + 1e-6), 0.1001 / 4, 1.001e-4, 0.2002]),
    ):
        for got, want in ((record.clipping_coef(clip), unbounded), (bounded.clipping_coef(clip), with_bound)):
            torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)
