"""The DP criterion of the clipping modes (also importable from its Opacus-style path,
``flashnorm.utils.fast_gradient_clipping_utils``): ``loss.backward()`` runs the whole clipping workflow.

Reuses Opacus's ``DPLossFastGradientClipping`` (per-sample losses, ``shape=(B, T, V)`` for
token-level losses with the sequence as privacy unit, ``ignore_index``) and its loss arithmetic;
only ``backward`` differs: it asks the grad-sample module for its norm pass and its way of
writing the clipped gradient (second pass or one-pass assembly). FlashNorm adds what a training loop written
for a loss tensor expects (`DPTensorFastGradientClipping`) and checks, when the criterion is called, that the
loss holds one value per sample.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
from opacus.utils import fast_gradient_clipping_utils as _opacus

#: How to get a tensor's worth out of the DP loss, for the error of a tensor attribute it lacks.
_INSTEAD = (
    "its value is loss.item(), float(loss) or loss.detach() (a 0-d tensor, mean or sum of the per-sample losses "
    "by loss_reduction), its per-sample losses [B] are loss.loss_per_sample; loss.mean() and loss.sum() return the "
    "DP loss itself, and loss.backward() runs the clipping. Its graph must be back-propagated by that backward only: "
    "a plain backward of a tensor taken from it would not clip each sample's gradient."
)


class DPTensorFastGradientClipping(_opacus.DPTensorFastGradientClipping):
    """The DP loss: per-sample losses ℓ: [B] (``loss_per_sample``) standing for one scalar L, their mean
    (``loss_reduction="mean"``) or sum, whose ``backward()`` leaves Σ_b c_b ∇ℓ_b in ``p.grad``.

    Where a training loop expects a 0-d loss tensor, it answers as L does:

    * ``loss.item()``, ``float(loss)``, ``f"{loss:.4f}"``: L as a Python float; ``loss.detach()``: L as a 0-d
      tensor without graph.
    * ``loss.mean()``, ``loss.sum()``: the DP loss itself (the mean or sum of one scalar is that scalar), so
      ``loss.mean().backward()`` still clips.
    * ``+``, ``-``, ``*``, ``/`` with a number, a [B] tensor or another DP loss act on the per-sample losses and
      return a DP loss.

    Any other ``Tensor`` attribute (``loss.cpu()``, ``loss.grad_fn``, ``loss.mean(dim=0)``, ...) raises, saying
    what to use instead: no plain tensor that could be back-propagated without clipping comes out of it.
    """

    def backward(self):
        """Σ_b c_b ∇ℓ_b into ``p.grad`` of every trainable parameter (the module's clipping workflow)."""
        self.module.clipped_backward(self.loss_per_sample, zero_grad=self.optimizer.zero_grad)

    def item(self) -> float:
        """L as a Python float."""
        return float(self.detach().item())

    def detach(self) -> torch.Tensor:
        """L as a 0-d tensor without graph (the mean or the sum of the per-sample losses, by ``loss_reduction``)."""
        return super().detach()

    def mean(self, *args, **kwargs) -> DPTensorFastGradientClipping:
        """The DP loss itself: L is one scalar already (raises for ``dim``/``dtype`` arguments)."""
        self._no_arguments("mean", args, kwargs)
        return self

    def sum(self, *args, **kwargs) -> DPTensorFastGradientClipping:
        """The DP loss itself: L is one scalar already (raises for ``dim``/``dtype`` arguments)."""
        self._no_arguments("sum", args, kwargs)
        return self

    def __float__(self) -> float:
        return self.item()

    def __format__(self, spec: str) -> str:
        return format(self.item(), spec) if spec else str(self)

    def __getattr__(self, name: str):
        # Only reached for attributes the DP loss lacks; a Tensor attribute gets the explanation.
        if not name.startswith("__") and hasattr(torch.Tensor, name):
            raise AttributeError(
                f"The DP loss has no Tensor attribute {name!r}: it is not a tensor but per-sample losses whose "
                f"backward() clips each sample's gradient; {_INSTEAD}"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _no_arguments(self, name: str, args, kwargs) -> None:
        if args or kwargs:
            raise TypeError(
                f"loss.{name}() takes no arguments on the DP loss: it stands for one scalar, the "
                f"{self.loss_reduction} of its per-sample losses, and loss.{name}() returns it unchanged; "
                f"{_INSTEAD}"
            )


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

    def __call__(self, *args, shape: Optional[Sequence[int]] = None, **kwargs) -> DPTensorFastGradientClipping:
        """The per-sample losses ℓ: [B] of this batch, as a DP loss.

        Args:
            *args, **kwargs: the criterion's arguments, e.g. ``(logits [B, C], target [B])``.
            shape: for token-level losses, the logits' shape ``(B, T, V)`` before flattening to [B·T, V]: the
                criterion's B·T token losses become one per sequence (their mean, without ``ignore_index``
                tokens, or their sum).

        Raises:
            ValueError: ``shape`` given, but the criterion's unreduced loss does not hold B·T values; or no
                ``shape`` and the loss holds k·B values for the model's batch of B (k > 1: one per token).
        """
        if shape is not None:
            shape = _checked_shape(shape)
        out = super().__call__(*args, shape=shape, **kwargs)
        _check_one_per_sample(out.loss_per_sample, shape, _forward_batch_size(self.module))
        return DPTensorFastGradientClipping(out.module, out.optimizer, out.loss_per_sample, out.loss_reduction)


def _checked_shape(shape) -> tuple:
    """``shape`` as a tuple whose first two entries are integers (B, T), else a ValueError."""
    try:
        shape = tuple(shape)
        batch, steps = operator.index(shape[0]), operator.index(shape[1])
    except (TypeError, IndexError):
        raise ValueError(f"shape={shape!r}: pass the logits' shape before flattening, (B, T, V).") from None
    return (batch, steps, *shape[2:])


def _forward_batch_size(module) -> Optional[int]:
    """The batch size of the module's captured forward (its layers', else its first argument's), if one is known."""
    step = getattr(module, "step", None)
    if step is None:
        return None
    return step.batch_size if step.batch_size is not None else step.leading_batch_size


def _check_one_per_sample(loss: torch.Tensor, shape: Optional[Sequence[int]], batch: Optional[int]) -> None:
    """Raises unless ``loss`` can be one value per sample (``[B]`` or ``[B, 1]``), naming the fix."""
    per_sample = loss.dim() == 1 or (loss.dim() == 2 and loss.shape[1] == 1)
    if shape is not None:
        if not (per_sample and loss.shape[0] == shape[0]):
            raise ValueError(
                f"criterion(..., shape={tuple(shape)}) needs the criterion's unreduced loss to hold B·T = "
                f"{shape[0]}·{shape[1]} = {shape[0] * shape[1]} values, one per token in sample order, but it holds "
                f"{tuple(loss.shape)}. Flatten the logits to [B·T, V] and the targets to [B·T], and give the shape "
                "of the logits that were flattened (after a shift, shape=(B, T - 1, V))."
            )
        return
    if per_sample and batch and loss.shape[0] != batch and loss.shape[0] % batch == 0:
        raise ValueError(
            f"The criterion returned {loss.shape[0]} losses for the model's batch of {batch} samples, "
            f"{loss.shape[0] // batch} per sample (one per token?). DP clips each sample's gradient, so the loss must "
            "be one value per sample: for token-level losses pass the logits' shape, criterion(logits.view(-1, V), "
            "targets.view(-1), shape=(B, T, V)), which takes each sequence's mean (or sum) of its token losses."
        )
