"""Lightning's automatic optimisation with FlashNorm's DP criterion: :class:`DPStrategy`.

FlashNorm's criterion returns a DP loss (per-sample losses ℓ: [B] whose ``backward()`` runs the clipping
workflow), not a ``Tensor``, so Lightning's automatic loop refuses it ("training_step must return a
Tensor"). :class:`DPStrategy` is the single-device strategy plus two things: ``training_step`` may return
that DP loss (alone or under ``"loss"`` in a dict) — Lightning gets its value, mean_b ℓ_b, for logging —
and the backward of that step runs the DP loss's own backward (Σ_b c_b ∇ℓ_b into ``p.grad``). The
optimizer step (noise, division by the expected batch size, accountant step) is the DP optimizer's own,
called by Lightning.

The LightningModule does what an Opacus user does with Lightning: ``configure_optimizers`` calls
``make_private`` on its network, optimizer and training loader, keeps the wrapped network and the DP
criterion, returns the DP optimizer, and ``train_dataloader`` returns the Poisson loader (Lightning asks
for the loaders after the optimizers)::

    class Model(L.LightningModule):
        def configure_optimizers(self):
            self.dp_net, optimizer, self.criterion, self.loader = self.engine.make_private(
                module=self.net, optimizer=torch.optim.SGD(self.net.parameters(), lr=0.1),
                criterion=nn.CrossEntropyLoss(), data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                grad_sample_mode="flash_fuse")
            return optimizer

        def train_dataloader(self):
            return self.loader

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.criterion(self.dp_net(x), y)

    L.Trainer(strategy=DPStrategy(), max_epochs=1).fit(model)

Manual optimisation needs no more: ``self.manual_backward(loss)`` runs the DP loss's backward (and
under ``DPStrategy`` training_step may return the DP loss for logging).

``accumulate_grad_batches=k`` sums the clipped sums of k batches into one step, divided by k × the expected
batch size and accounted at k × the sample rate, as Opacus's hooks mode does. Refused: ``gradient_clip_val``
(the per-sample bound is ``max_grad_norm``) and fp16 (its loss scaler is not applied to the DP loss).
Needs the ``[lightning]`` extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from lightning.pytorch.strategies import SingleDeviceStrategy

from ..criterion import DPTensorFastGradientClipping


class DPStrategy(SingleDeviceStrategy):
    """``SingleDeviceStrategy`` whose ``training_step`` may return FlashNorm's DP loss (see the module docstring).

    Args: those of :class:`lightning.pytorch.strategies.SingleDeviceStrategy` (``device`` defaults to the CPU,
    as there; pass ``device="cuda"`` for a GPU).
    """

    def __init__(self, device: Any = "cpu", **kwargs):
        super().__init__(device=device, **kwargs)
        self._dp_loss: Optional[DPTensorFastGradientClipping] = None

    def setup(self, trainer) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(
                f"gradient_clip_val={trainer.gradient_clip_val}: DP clips each sample's gradient to the max_grad_norm "
                "given to make_private; clipping the noisy batch gradient again is not part of DP-SGD."
            )
        if str(trainer.precision).startswith("16-mixed"):
            raise ValueError(
                "precision='16-mixed' needs a loss scaler, which the DP loss does not use: use 'bf16-mixed'."
            )
        super().setup(trainer)

    def training_step(self, *args: Any, **kwargs: Any):
        """The module's ``training_step``; a DP loss in its output is replaced by its value (a detached scalar,
        ``mean_b ℓ_b`` for ``loss_reduction="mean"``) and, under automatic optimisation, kept for the backward."""
        output = super().training_step(*args, **kwargs)
        automatic = self.lightning_module.automatic_optimization
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if loss is None:  # Lightning skips the step
            return output
        if not isinstance(loss, DPTensorFastGradientClipping):
            if not automatic:
                return output
            raise TypeError(
                f"training_step returned a {type(loss).__name__} loss; DPStrategy trains on the loss of FlashNorm's "
                "DP criterion (the criterion returned by make_private), whose backward clips each sample."
            )
        if automatic:  # manual optimisation ran its backward already (manual_backward)
            self._dp_loss = loss
        return {**output, "loss": loss.detach()} if isinstance(output, Mapping) else loss.detach()

    def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
        """Lightning's backward (hooks and precision plugin around it) applied to the step's DP loss."""
        if self._dp_loss is None:  # manual optimisation: manual_backward(dp_loss) hands the DP loss itself
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        dp_loss, self._dp_loss = self._dp_loss, None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self.precision_plugin.backward(dp_loss, self.lightning_module, optimizer, *args, **kwargs)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss
