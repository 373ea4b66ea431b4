"""The phase ranges a clipping step emits (flashnorm.grad_sample.phases): the overhead benchmark's breakdown
reads them, so each range it expects must appear in a profiled step."""

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from torch.utils.data import DataLoader, TensorDataset

from benchmarks.overhead import LIBRARY_RANGES
from flashnorm import PrivacyEngine
from flashnorm.grad_sample import phases


def _profiled_names(mode: str, batch: int) -> set:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    x, y = torch.randn(batch, 6), torch.randint(0, 3, (batch,))
    dp_model, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch), criterion=nn.CrossEntropyLoss(),
        noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
    )
    for _ in range(2):  # the second step: B = 1 steps park the hooks once a step has seen the batch size
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            criterion(dp_model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return {event.name for event in prof.events()}


def test_the_benchmark_reads_only_ranges_the_library_declares():
    assert set(LIBRARY_RANGES) <= set(phases.PHASES)


@pytest.mark.parametrize("mode", ["ghost", "flash", "flash_fuse"])
def test_every_phase_of_a_step_is_a_named_range(mode):
    names = _profiled_names(mode, batch=4)
    expected = set(phases.PHASES) - {phases.SINGLE_SAMPLE}
    assert expected <= names, f"missing ranges: {sorted(expected - names)}"
    assert phases.SINGLE_SAMPLE not in names


@pytest.mark.parametrize("mode", ["ghost", "flash_fuse"])
def test_a_step_of_one_sample_is_its_own_range(mode):
    names = _profiled_names(mode, batch=1)
    assert {phases.CLIPPED_BACKWARD, phases.SINGLE_SAMPLE} <= names
    assert phases.NORM_PASS not in names and phases.FORWARD_HOOK not in names  # nothing captured, no norm pass


def test_no_range_is_opened_without_a_profiler():
    assert phases.phase(phases.NORMS) is phases.phase(phases.WRITE), "one shared no-op context when not profiling"
