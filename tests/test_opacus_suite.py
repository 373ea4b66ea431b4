"""Opacus's own ghost-clipping tests, run against FlashNorm in each single-process clipping mode.

Each mode runs Opacus's ``grad_sample_module_fast_gradient_clipping_test`` and the wrapped-module test of
``grad_sample_hooks_fast_gradient_clipping_test`` (the opacus wheel ships them) in a fresh pytest process with
FlashNorm's classes put where the tests import Opacus's (`tests.opacus_suite`). Every test that runs must
pass, except the strict expected failures that plugin lists with their reasons; Opacus's contract tests
(per-sample norms against Opacus's per-sample gradients, per-parameter ``_norm_sample``, the update, the
embedding's norms after Opacus's two-backward loop, the hooks class against the wrapped module) must be among
the passes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLIPPING_MODES
from tests.opacus_suite import EXPECTED_FAILURES

pytest.importorskip("hypothesis", reason="Opacus's tests use hypothesis (FlashNorm's dev extra installs it)")

ROOT = Path(__file__).resolve().parents[1]
OPACUS_TESTS = (
    "opacus.tests.grad_sample_module_fast_gradient_clipping_test",
    "opacus.tests.grad_sample_hooks_fast_gradient_clipping_test",
)
#: Tests that check what FlashNorm computes against Opacus's reference (node id suffixes).
CONTRACT = (
    "GradSampleModuleFastGradientClippingTest::test_norm_calculation_fast_gradient_clipping",
    "GradSampleModuleFastGradientClippingTest::test_weight_update_fast_gradient_clipping",
    "GradSampleModuleFastGradientClippingEmbeddingLayerTest::test_norm_calculation",
    "GradSampleHooksFastGradientClippingTest::test_hooks_vs_wrapped_equivalence",
)


def run_opacus_suite(mode: str, workdir: Path) -> list:
    """The outcomes ({nodeid, when, outcome, message}) of Opacus's tests against ``mode``, run in ``workdir`` (where
    hypothesis keeps its database)."""
    report = workdir / "report.jsonl"
    env = dict(os.environ, FLASHNORM_OPACUS_MODE=mode, FLASHNORM_OPACUS_REPORT=str(report), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "-p", "tests.opacus_suite",
         "--pyargs", *OPACUS_TESTS],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )
    if not report.exists():
        pytest.fail(f"Opacus's suite did not run (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in report.read_text().splitlines()]


@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_opacus_ghost_clipping_suite_passes(mode, tmp_path):
    outcomes = run_opacus_suite(mode, tmp_path)
    by_outcome = {}
    for o in outcomes:
        by_outcome.setdefault(o["outcome"], []).append(o)
    failed = [f"{o['nodeid']} ({o['when']}): {o['message']}" for o in by_outcome.get("failed", [])]
    assert not failed, "\n".join(failed)
    assert not by_outcome.get("xpassed"), "an expected failure passed: update EXPECTED_FAILURES"
    xfailed = {o["nodeid"] for o in by_outcome.get("xfailed", [])}
    assert {s for s in EXPECTED_FAILURES if any(n.endswith(s) for n in xfailed)} == set(EXPECTED_FAILURES)
    passed = {o["nodeid"] for o in by_outcome.get("passed", [])}
    missing = [s for s in CONTRACT if not any(n.endswith(s) for n in passed)]
    assert not missing, f"contract tests that did not pass: {missing}"
