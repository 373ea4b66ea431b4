"""Float64 ground truth for the norm rules, and the assertions that hold a rule to it.

The output gradient g is the gradient of Σ_b ℓ_b with respect to the layer's output y (batch first), and
y_b depends on sample b alone, so ∇_θ ℓ_b = ∇_θ ⟨y_b, g_b⟩: one sample at a time through a float64 copy of
the layer, with ordinary autograd (the style of tests/oracle.py), never through flashnorm. A rule that the
library must pick up in a real step is checked by `assert_step_exact` against tests/oracle.py itself.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from flashnorm.norms import NormRule
from tests.conftest import TOLERANCES, fp32_tolerance
from tests.oracle import microbatch_reference

Grads = Dict[nn.Parameter, torch.Tensor]


def per_sample_truth(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Grads:
    """{θ: [B, *θ.shape] float64} for every trainable parameter θ of ``layer`` (its children's included)."""
    ref = copy.deepcopy(layer).double()
    pairs = [(p, q) for p, q in zip(layer.parameters(), ref.parameters()) if p.requires_grad]
    truth = {p: torch.zeros(x.shape[0], *p.shape, dtype=torch.float64, device=p.device) for p, _ in pairs}
    for b in range(x.shape[0]):
        xb = x[b : b + 1].double() if x.is_floating_point() else x[b : b + 1]
        surrogate = (ref(xb) * g[b : b + 1].double()).sum()
        grads = torch.autograd.grad(surrogate, [q for _, q in pairs], allow_unused=True)
        for (p, _), grad in zip(pairs, grads):
            if grad is not None:
                truth[p][b] = grad
    return truth


def input_and_output_grad(layer: nn.Module, x_shape: tuple, dtype: torch.dtype, device) -> tuple:
    """A random input x of ``x_shape`` and a random output gradient g of the layer's output shape for it."""
    x = torch.randn(x_shape, dtype=dtype, device=device)
    with torch.no_grad():
        out_shape = layer(x).shape
    return x, torch.randn(out_shape, dtype=dtype, device=device)


def norm_sq_of(grads: Grads, batch: int) -> torch.Tensor:
    """Σ_θ ‖grads[θ][b]‖² → [B] float64."""
    total = torch.zeros(batch, dtype=torch.float64)
    for gs in grads.values():
        total += gs.double().cpu().flatten(1).square().sum(dim=1)
    return total


def clipped_of(grads: Grads, coef: torch.Tensor) -> Grads:
    """Σ_b c_b grads[θ][b] for each θ, float64."""
    return {p: torch.einsum("b,b...->...", coef.double(), gs.double()) for p, gs in grads.items()}


def tolerance_of(dtype: torch.dtype, device: torch.device) -> tuple:
    """The tolerance table's (rtol, atol) against float64 for a compute dtype (fp64: exact algebra; fp32: 1e-5 on
    the CPU, tf32's on CUDA)."""
    return TOLERANCES["fp64"] if dtype == torch.float64 else fp32_tolerance(device)


def assert_matches(out: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Per sample (first dim), ‖out_b − truth_b‖ ≤ atol + rtol·‖truth_b‖ at the tolerance of ``dtype``.

    Norm-wise, as a gradient is used: an element of an fp32 sum over T = 601 terms that cancels to near zero
    carries an absolute error of order T·ε·max|term| that no element-wise rtol allows, while any algebraic
    error (a missing term, a sample mixed in) moves the whole vector by far more than rtol.
    """
    rtol, atol = tolerance_of(dtype, out.device)
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    out, truth = out.double().cpu().flatten(1), truth.cpu().flatten(1)
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    error, size = (out - truth).norm(dim=1), truth.norm(dim=1)
    bad = error > atol + rtol * size
    assert not bad.any(), (
        f"{what}: samples {bad.nonzero().flatten().tolist()} off by {error[bad].tolist()} "
        f"(norms {size[bad].tolist()}; rtol {rtol}, atol {atol})"
    )


def assert_grads_match(
    out: Grads, truth: Grads, dtype: torch.dtype, what: str, names: Dict[nn.Parameter, str], per_sample: bool = True
) -> None:
    """The same parameters, each matching (per sample, or as one vector for a clipped sum)."""
    got_names, expected_names = sorted(names[p] for p in out), sorted(names[p] for p in truth)
    assert got_names == expected_names, f"{what}: parameters {got_names}, expected {expected_names}"
    for p, expected in truth.items():
        got = out[p] if per_sample else out[p].unsqueeze(0)
        assert_matches(got, expected if per_sample else expected.unsqueeze(0), dtype, f"{what}[{names[p]}]")


def assert_rule_exact(
    rule: NormRule, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, methods: Optional[Iterable[str]] = None
) -> None:
    """Every entry point of ``rule`` on (x, g) against `per_sample_truth`, at the tolerance of g's dtype.

    Checks ``norm_sq`` by each of ``methods`` (default ``rule.methods``) → [B] float32 (float64 for float64
    inputs); ``per_sample_grads`` with and without ``out=`` slots of ``per_sample_dtype``; ``clipped_grads``
    for coefficients c ∈ (0, 1] in the parameters' dtypes; and, for a rule with ``vector_params``,
    ``vector_grads`` and the ``vectors=False`` forms of ``norm_sq`` and ``clipped_grads``.
    """
    batch, dtype = g.shape[0], g.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    names = {p: n for n, p in layer.named_parameters()}
    truth = per_sample_truth(layer, x, g)
    norm_sq = norm_sq_of(truth, batch)

    for method in rule.methods if methods is None else methods:
        out = rule.norm_sq(layer, x, g, method=method)
        assert out.dtype == acc, f"norm_sq({method!r}) dtype {out.dtype}, expected {acc}"
        assert_matches(out.unsqueeze(1), norm_sq.unsqueeze(1), dtype, f"norm_sq({method!r})")

    assert_grads_match(rule.per_sample_grads(layer, x, g), truth, dtype, "per_sample_grads", names)
    slot_dtype = rule.per_sample_dtype(layer, x.dtype, g.dtype)
    if slot_dtype is not None:
        slots = {p: torch.full_like(gs, float("nan"), dtype=slot_dtype) for p, gs in truth.items()}
        written = rule.per_sample_grads(layer, x, g, out=slots)
        assert all(gs.dtype == slot_dtype for gs in written.values()), "per_sample_grads(out=) ignores per_sample_dtype"
        assert_grads_match(written, truth, dtype, "per_sample_grads(out=)", names)

    coef = torch.rand(batch, dtype=acc, device=g.device) * 0.9 + 0.1
    clipped = rule.clipped_grads(layer, x, g, coef)
    assert all(c.dtype == p.dtype for p, c in clipped.items()), "clipped_grads must be in the parameters' dtypes"
    assert_grads_match(clipped, clipped_of(truth, coef), dtype, "clipped_grads", names, per_sample=False)

    vectors = rule.vector_params(layer)
    if vectors:
        slots = {p: torch.full_like(truth[p], float("nan"), dtype=acc) for p in vectors}
        vector_truth = {p: truth[p] for p in vectors}
        assert_grads_match(rule.vector_grads(layer, x, g, out=slots), vector_truth, dtype, "vector_grads", names)
        rest = {p: gs for p, gs in truth.items() if p not in vector_truth}
        for method in rule.methods if methods is None else methods:
            out = rule.norm_sq(layer, x, g, method=method, vectors=False)
            expected = norm_sq_of(rest, batch).unsqueeze(1)
            assert_matches(out.unsqueeze(1), expected, dtype, f"norm_sq({method!r}, vectors=False)")
        clipped = rule.clipped_grads(layer, x, g, coef, vectors=False)
        assert_grads_match(clipped, clipped_of(rest, coef), dtype, "clipped_grads(vectors=False)", names,
                           per_sample=False)


def assert_step_exact(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, max_grad_norm: float = 1e-2
) -> None:
    """One DP step of a float64 ``model`` through the public API (σ = 0, sum reduction, every sample clipped)
    against the float64 microbatch oracle: per-sample norms and the clipped sum Σ_b c_b ∇ℓ_b."""
    loss = nn.CrossEntropyLoss(reduction="sum")
    oracle = microbatch_reference(model, x, y, loss, max_grad_norm)
    assert (oracle.norms > max_grad_norm).all(), "the case must clip every sample"
    dp_model, optimizer, criterion, _ = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=loss,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=x.shape[0]), noise_multiplier=0.0,
        max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode, loss_reduction="sum",
    )  # fmt: skip
    criterion(dp_model(x), y).backward()
    optimizer.step()
    rtol, atol = TOLERANCES["fp64"]
    torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=rtol, atol=atol)
    for name, p in model.named_parameters():
        expected = oracle.clipped_sum[name]
        torch.testing.assert_close(p.grad, expected, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
