"""The DP criterion of the clipping modes (also importable from its Opacus-style path,
``flashnorm.utils.fast_gradient_clipping_utils``): ``loss.backward()`` runs the whole clipping workflow.

Reuses Opacus's ``DPLossFastGradientClipping`` (per-sample losses, ``shape=(B, T, V)`` for
token-level losses with the sequence as privacy unit, ``ignore_index``) and its loss arithmetic;
only ``backward`` differs: it asks the grad-sample module for its norm pass and its way of
writing the clipped gradient (second pass or one-pass assembly).
"""

from __future__ import annotations

from opacus.utils import fast_gradient_clipping_utils as _opacus


class DPTensorFastGradientClipping(_opacus.DPTensorFastGradientClipping):
    """Per-sample losses [B] whose ``backward()`` leaves Σ_b c_b ∇ℓ_b in ``p.grad``."""

    def backward(self):
        self.module.clipped_backward(self.loss_per_sample, zero_grad=self.optimizer.zero_grad)


def _keep_type(name):
    opacus_op = getattr(_opacus.DPTensorFastGradientClipping, name)

    def op(self, *args):
        out = opacus_op(self, *args)
        return DPTensorFastGradientClipping(out.module, out.optimizer, out.loss_per_sample, out.loss_reduction)

    op.__name__ = name
    op.__doc__ = f"Opacus's ``{name}``, returning a FlashNorm DP tensor."
    return op


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__neg__"):
    setattr(DPTensorFastGradientClipping, _name, _keep_type(_name))


class DPLossFastGradientClipping(_opacus.DPLossFastGradientClipping):
    """``DPLossFastGradientClipping(module, optimizer, criterion, loss_reduction="mean")``.

    Calling it (``criterion(logits, target, shape=None)``) returns a
    `DPTensorFastGradientClipping`. The module clips with the optimizer's σ and C from then on (one
    `PrivacyParameters`, which the optimizer owns).
    """

    def __init__(self, module, optimizer, criterion, loss_reduction: str = "mean"):
        super().__init__(module, optimizer, criterion, loss_reduction)
        privacy = getattr(optimizer, "privacy", None)
        if privacy is not None:
            module.share_privacy_parameters(privacy)

    def __call__(self, *args, shape=None, **kwargs) -> DPTensorFastGradientClipping:
        out = super().__call__(*args, shape=shape, **kwargs)
        return DPTensorFastGradientClipping(out.module, out.optimizer, out.loss_per_sample, out.loss_reduction)
