"""Opacus's DP RNNs (DPLSTM, DPGRU, DPRNN) in the sequence-first layout, ``make_private(batch_first=False)``: their
cells' ``RNNLinear`` layers are called once per time step with [B, D] whatever the model's layout, and are captured as
such; every mode matches the float64 oracle."""

import pytest
import torch
import torch.nn as nn
from opacus.layers import DPGRU, DPLSTM, DPRNN
from torch.utils.data import DataLoader, TensorDataset

from flashnorm import FlashNormPrivacyEngine
from tests.conftest import CLIPPING_MODES, TOLERANCES
from tests.oracle import microbatch_reference


class _SequenceFirstRNN(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x: [T, B, 4]
        out = self.rnn(x)[0]
        return self.head(out)[-1]  # the head on [T, B, 5], as every layer of a sequence-first model


@pytest.mark.parametrize("cell", [DPLSTM, DPGRU, DPRNN])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_sequence_first_dp_rnns_match_float64(mode, cell):
    torch.manual_seed(0)
    model = _SequenceFirstRNN(cell).double()
    x, y = torch.randn(7, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    clip = 1e-2
    oracle = microbatch_reference(
        model, x.transpose(0, 1), y, lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum"), clip,
        forward=lambda m, xb: m(xb.transpose(0, 1)),
    )
    dp_model, dp_opt, criterion, _ = FlashNormPrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x.transpose(0, 1), y), batch_size=4),
        criterion=nn.CrossEntropyLoss(reduction="sum"), noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode=mode, loss_reduction="sum", batch_first=False,
    )
    criterion(dp_model(x), y).backward()
    rtol, atol = TOLERANCES["fp64"]
    torch.testing.assert_close(dp_model.get_norm_sample(), oracle.norms, rtol=rtol, atol=atol)
    dp_opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle.clipped_sum[name], rtol=rtol, atol=atol)
