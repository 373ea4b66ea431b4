"""Opacus's DP RNNs (DPLSTM, DPGRU, DPRNN) in the sequence-first layout, ``make_private(batch_first=False)``: their
cells' ``RNNLinear`` layers are called once per time step with [B, D] whatever the model's layout, and are captured as
such; every mode matches the float64 oracle."""

import pytest
import torch
import torch.nn as nn
from opacus.layers import DPGRU, DPLSTM, DPRNN

from tests.conftest import CLIPPING_MODES
from tests.oracle import assert_sequence_first_step_matches_float64


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
    x, y = torch.randn(37, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert_sequence_first_step_matches_float64(model, x, y, mode)
