"""Opacus's import path of the DP criterion (flashnorm/utils/fast_gradient_clipping_utils.py): the names it exports are
flashnorm.criterion's objects themselves (FlashNorm's, not Opacus's), and nothing else. What they do:
tests/test_criterion.py."""

from opacus.utils import fast_gradient_clipping_utils as opacus_utils

from flashnorm import criterion
from flashnorm.utils import fast_gradient_clipping_utils

NAMES = ["DPLossFastGradientClipping", "DPTensorFastGradientClipping"]


def test_the_exported_names_are_the_criterion_modules_objects():
    assert sorted(fast_gradient_clipping_utils.__all__) == NAMES
    for name in NAMES:
        exported = getattr(fast_gradient_clipping_utils, name)
        assert exported is getattr(criterion, name)
        assert exported is not getattr(opacus_utils, name) and issubclass(exported, getattr(opacus_utils, name))


def test_a_star_import_gives_exactly_those_names():
    namespace = {}
    exec("from flashnorm.utils.fast_gradient_clipping_utils import *", namespace)
    assert sorted(k for k in namespace if not k.startswith("__")) == NAMES
    assert all(namespace[name] is getattr(criterion, name) for name in NAMES)
