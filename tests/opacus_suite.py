"""A pytest plugin that runs Opacus's own ghost-clipping tests against FlashNorm (``tests/test_opacus_suite.py``).

Loaded with ``-p tests.opacus_suite`` and ``FLASHNORM_OPACUS_MODE`` set to one of FlashNorm's single-process
clipping modes (``ghost``, ``flash``, ``flash_fuse``), it puts FlashNorm's classes where Opacus's tests import
Opacus's, before any test module is imported:

* ``GradSampleModuleFastGradientClipping`` (``opacus.grad_sample`` and its defining module): the mode's module
  class (`flashnorm.resolver.module_class`) with the mode's norm algorithm, whatever the test's
  ``use_ghost_clipping`` says (that flag chooses between Opacus's two algorithms; the mode chooses FlashNorm's);
* ``DPOptimizerFastGradientClipping`` (``opacus.optimizers``) and the DP loss and tensor
  (``opacus.utils.fast_gradient_clipping_utils``): FlashNorm's.

Opacus's non-wrapping ``GradSampleHooksFastGradientClipping`` has no FlashNorm counterpart and stays Opacus's:
it is the reference the wrapped module is compared with.

Which tests run (``pytest_collection_modifyitems``): those that build the substituted classes. Tests of Opacus's
own classes alone are deselected: the ``GradSampleModuleTest`` class that ``grad_sample_module_fast_gradient_clipping_test``
imports (it tests ``GradSampleModule``), every test of the hooks class but the one comparing it with the wrapped
module, and, without torchvision, the one test that builds ``mobilenet_v3_small`` (it checks Opacus's
``GradSampleModule``). Tests where FlashNorm differs from Opacus for a stated reason are strict expected failures
(`EXPECTED_FAILURES`). Every test's outcome is written as JSON lines to ``FLASHNORM_OPACUS_REPORT``.

Without torchvision (no CPU build of it installs beside the CPU torch from PyPI), the three names
``grad_sample_module_test.py`` imports from it are replaced by `tests.torchvision_stand_in`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

#: node id suffix → why FlashNorm fails the test (a strict xfail: it must fail).
EXPECTED_FAILURES = {
    "GradSampleModuleFastGradientClippingEmbeddingLayerTest::test_gradient_calculation": (
        "Opacus's test is right only through Opacus's broadcast: its CrossEntropyLoss on [B, 2, 1] logits gives a "
        "per-sample loss [B, 1], which Opacus's DP tensor multiplies by c [B] into a [B, B] matrix, so its second "
        "backward applies (Σ_b c_b)·Σ_b ∇ℓ_b; divided by B = 3 with every c_b = 1 that equals the Σ_b c_b ∇ℓ_b of "
        "plain Opacus's summed_grad it is compared with. FlashNorm reads [B, 1] as [B] and applies Σ_b c_b ∇ℓ_b / B, "
        "the float64 oracle's (tests/grad_sample/test_contract.py::test_a_per_sample_loss_of_shape_b_by_one_is_accepted)"
    ),
}
#: Tests of Opacus's own classes only (node id parts), deselected.
OPACUS_ONLY = ("::GradSampleModuleTest::",)
#: The one test of ``grad_sample_hooks_fast_gradient_clipping_test`` that builds the wrapped module.
HOOKS_FILE, HOOKS_TEST = "grad_sample_hooks_fast_gradient_clipping_test", "test_hooks_vs_wrapped_equivalence"
#: Needs torchvision's mobilenet_v3_small (and checks Opacus's GradSampleModule on it).
NEEDS_TORCHVISION = "test_custom_module_validation"


def _substitute_module_class(mode_name: str) -> type:
    """The mode's single-process grad-sample module class, built with the mode's norm algorithm; Opacus's
    ``use_ghost_clipping``/``force_functorch`` flags, which choose among Opacus's algorithms, are accepted and
    not used."""
    from flashnorm.modes import get_mode
    from flashnorm.resolver import module_class

    mode = get_mode(mode_name)
    base = module_class("single", mode.writer)

    def __init__(self, m, *, use_ghost_clipping=True, use_flash_clipping=True, force_functorch=False, **kwargs):
        base.__init__(self, m, norm_algorithm=mode.norm_algorithm, per_parameter_norms=True, **kwargs)

    return type(base.__name__, (base,), {
        "__init__": __init__, "__module__": __name__,
        "__doc__": f"FlashNorm's {base.__name__} in mode {mode.name!r}, put where Opacus's tests expect Opacus's.",
    })


def install(mode_name: str) -> None:
    """Puts FlashNorm's classes of ``mode_name`` where Opacus's tests import Opacus's (see the module docstring)."""
    import opacus.grad_sample
    import opacus.grad_sample.grad_sample_module_fast_gradient_clipping as opacus_fgc
    import opacus.optimizers
    import opacus.utils.fast_gradient_clipping_utils as opacus_loss

    import flashnorm.criterion
    import flashnorm.optimizers

    module_cls = _substitute_module_class(mode_name)
    for namespace in (opacus.grad_sample, opacus_fgc):
        namespace.GradSampleModuleFastGradientClipping = module_cls
    opacus.optimizers.DPOptimizerFastGradientClipping = flashnorm.optimizers.DPOptimizerFastGradientClipping
    opacus_loss.DPLossFastGradientClipping = flashnorm.criterion.DPLossFastGradientClipping
    opacus_loss.DPTensorFastGradientClipping = flashnorm.criterion.DPTensorFastGradientClipping


def _torchvision_or_stand_in() -> bool:
    """Whether the real torchvision imports; if not, `tests.torchvision_stand_in` is registered."""
    try:
        importlib.import_module("torchvision")
    except ImportError:
        from tests import torchvision_stand_in

        torchvision_stand_in.register(sys.modules)
        return False
    return True


def pytest_configure(config):
    mode = os.environ.get("FLASHNORM_OPACUS_MODE")
    if not mode:
        raise pytest.UsageError("tests.opacus_suite needs FLASHNORM_OPACUS_MODE (ghost, flash or flash_fuse).")
    install(mode)  # first: FlashNorm imports transformers, which must not find the stand-in
    config.stash[_REAL_TORCHVISION] = _torchvision_or_stand_in()


_REAL_TORCHVISION = pytest.StashKey[bool]()


def _opacus_only(item, real_torchvision: bool) -> bool:
    return (any(part in item.nodeid for part in OPACUS_ONLY)
            or (HOOKS_FILE in item.module.__name__ and item.name != HOOKS_TEST)
            or (not real_torchvision and item.name == NEEDS_TORCHVISION))


def pytest_collection_modifyitems(config, items):
    real_torchvision = config.stash[_REAL_TORCHVISION]
    kept, dropped = [], []
    for item in items:
        (dropped if _opacus_only(item, real_torchvision) else kept).append(item)
        for suffix, reason in EXPECTED_FAILURES.items():
            if item.nodeid.endswith(suffix):
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_runtest_logreport(report):
    path = os.environ.get("FLASHNORM_OPACUS_REPORT")
    if not path or (report.when != "call" and report.outcome != "failed" and not report.skipped):
        return
    outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else (
        "xpassed" if hasattr(report, "wasxfail") else report.outcome)
    message = ""
    if report.failed and report.longrepr is not None:
        message = str(getattr(report.longrepr, "reprcrash", None) and report.longrepr.reprcrash.message or report.longrepr)
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": outcome,
                            "message": message[:400]}) + "\n")
