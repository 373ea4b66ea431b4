"""The library audits itself (one process): one short DP run with 20,000 white-box canaries per case.

In every clipping mode and at ε ≈ 1, 2, 4, 8 the audit's lower bounds stay at or below the engine's ε, and they
are far from vacuous (ε̂ f-DP ≥ ε / 4). Broken pipelines, built in ``runs.py`` from public pieces, give ε̂ > the ε
they report. Runs and seeds are those of the docs table (``python -m tests.auditing.report``).
"""

import pathlib
import re

import pytest

from tests.auditing import runs

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "auditing.md"

# Opacus's PRV accountant warns (log of 0) at q = ½ on the edge of its domain; its ε is unaffected.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


@pytest.mark.parametrize("epsilon", runs.EPSILONS)
@pytest.mark.parametrize("mode", runs.MODES)
def test_audit_of_a_correct_run_stays_below_the_accountant(mode, epsilon):
    result = runs.single_run(mode, epsilon).result()
    assert result.epsilon == pytest.approx(epsilon, rel=0.02)  # the engine accounted one epoch at q = ½
    assert result.epsilon_lower <= result.epsilon, result
    assert result.epsilon_lower_fdp <= result.epsilon, result
    assert result.epsilon_lower_fdp >= epsilon / 4, result  # the canaries are seen: the audit has teeth


BROKEN = {
    "noise sigma/4, epsilon reported for sigma": runs.low_noise_run,
    "clipping disabled": runs.unclipped_run,
}


@pytest.mark.parametrize("epsilon", (2.0, 4.0))
@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_broken_pipeline_gives_a_lower_bound_above_its_reported_epsilon(variant, epsilon):
    result = BROKEN[variant]("flash_fuse", epsilon).result()
    assert result.epsilon == pytest.approx(epsilon, rel=0.02)  # what the broken pipeline reports
    assert result.epsilon_lower_fdp > result.epsilon, result


def test_batches_shuffled_once_reported_as_poisson_are_caught():
    """A loader over one fixed shuffled order, kept every epoch, with Poisson's ε reported (≈ 16,300 steps)."""
    result = runs.shuffled_once_run("flash_fuse")
    assert result.epsilon == pytest.approx(3.77, rel=0.02)  # what the broken pipeline reports
    assert result.epsilon_lower_fdp > result.epsilon, result


def test_the_docs_walkthrough_runs_as_written(capsys):
    code = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)[0]
    namespace = {}
    exec(compile(code, str(PAGE), "exec"), namespace)  # noqa: S102 - our own documentation
    result = namespace["result"]
    assert "ε̂ f-DP" in capsys.readouterr().out
    assert result.passed and result.epsilon_lower_fdp > result.epsilon / 4, result
