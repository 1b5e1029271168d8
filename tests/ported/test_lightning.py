"""SyncBatchNorm cases ported from Lightning-AI's tests.

Source: ``tests_pytorch/.../test_sync_batchnorm_parity.py``, ``test_sync_batchnorm_parity``
(and its ``SyncBNModule``).

How the cases are ported, and what every file shares: :mod:`tests.ported.common`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close
from torch.utils.data import DataLoader, DistributedSampler

import syncbn
from tests.ported.common import PATHS, kernel_path


class _SyncBNModule(nn.Module):
    """Lightning's ``SyncBNModule``: BatchNorm1d(1) under ``torch.no_grad()``, then Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_layer = nn.BatchNorm1d(1)
        self.linear = nn.Linear(1, 10)

    def forward(self, batch):
        with torch.no_grad():
            out_bn = self.bn_layer(batch)
        return self.linear(out_bn).sum(), out_bn.detach()


def _lightning_parity(path: str, batch_size: int, steps: int):
    with kernel_path(path):
        torch.manual_seed(3)
        ddp = DDP(syncbn.convert_sync_batchnorm(_SyncBNModule()), find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.02)
        dataset = torch.arange(64, dtype=torch.float).view(-1, 1)
        sampler = DistributedSampler(
            dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=False
        )
        outputs = []
        for step, batch in enumerate(DataLoader(dataset, sampler=sampler, batch_size=batch_size)):
            opt.zero_grad()
            loss, out_bn = ddp(batch)
            outputs.append(out_bn)
            loss.backward()
            opt.step()
            if step == steps - 1:
                break
        return torch.stack(outputs)


@pytest.mark.parametrize("path", PATHS)
def test_lightning_sync_batchnorm_parity(run_ranks, path):
    """Ported from Lightning-AI's tests (tests_pytorch/.../test_sync_batchnorm_parity.py,
    ``test_sync_batchnorm_parity``): 2 ranks with batches of 4 drawn by a ``DistributedSampler``
    without shuffling (rank r gets samples r, r + 2, ...) from ``arange(64)``, the BN layer run
    under ``torch.no_grad()`` in training mode, 3 SGD steps; each rank's BN outputs equal the
    single-process BatchNorm1d's with batches of 8, every other row."""
    world, steps = 2, 3
    results = run_ranks(_lightning_parity, world, path, 4, steps)
    torch.manual_seed(3)
    model = _SyncBNModule()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    dataset = torch.arange(64, dtype=torch.float).view(-1, 1)
    outputs = []
    for step, batch in enumerate(DataLoader(dataset, batch_size=4 * world)):
        opt.zero_grad()
        loss, out_bn = model(batch)
        outputs.append(out_bn)
        loss.backward()
        opt.step()
        if step == steps - 1:
            break
    single = torch.stack(outputs)
    for rank, ours in enumerate(results):
        assert_close(ours, single[:, rank::world])
