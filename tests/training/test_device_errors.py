"""A SyncBN check that failed on the device (ranks at different layers, with the Triton kernels:
the default on CUDA) ends training at the next host sync with the layer's error, before the NaN
output it leaves could pass for a non-finite step. On CPU, the Triton kernels run interpreted and
raise at once, so the deferred path is driven by writing the device error word directly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncbn
from syncbn.kernels import triton_set
from syncbn.moments import layer_signature
from syncbn.testing import cuda_standin
from syncbn.training import loop
from syncbn.training.lifecycle.env import DistEnv
from syncbn.training.state.progress import RunState
from syncbn.training.steplog import StepLog

pytest.importorskip("triton")


def _run_of(model: nn.Module, device: torch.device) -> SimpleNamespace:
    """The parts of a Run that ``loop._sync`` reads: nonfinite=skip, one pending NaN step."""
    trainer = SimpleNamespace(log_every=1, nonfinite="skip", max_consecutive_skips=5)
    env = DistEnv(dist.get_rank(), dist.get_rank(), dist.get_world_size(), device, "gloo")
    steps = StepLog(4, device)
    steps.record(1, 0.1, torch.tensor(float("nan")), 1, torch.tensor(1.0))
    return SimpleNamespace(
        parts=SimpleNamespace(cfg=SimpleNamespace(trainer=trainer), env=env, model=model),
        state=RunState(reference_global_batch=2), steps=steps, skips_in_a_row=0,
        nonfinite_step=None, logger=SimpleNamespace(log=lambda *a, **k: None),
    )  # fmt: skip


def _failed_check_at_the_next_sync() -> str:
    device = torch.device("cpu")
    model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with cuda_standin.path("triton"):
        model(torch.randn(5, 3)).sum().backward()  # every rank at the layer: its name registered
    # What the normalize kernel leaves on a GPU when the ranks were at different layers:
    triton_set.device_error_word(device).fill_(1 + 4 * layer_signature("1", 4))
    stop = SimpleNamespace(requested=False)
    try:
        code = loop._sync(_run_of(model, device), stop)
    except RuntimeError as error:
        return str(error)
    return f"no error (exit code {code})"


def test_a_failed_device_check_raises_naming_the_layer_at_the_sync(run_ranks):
    errors = run_ranks(_failed_check_at_the_next_sync, 2, timeout=60)
    for error in errors:
        assert "SyncBatchNorm layer '1' expected every rank of its group" in error, error
