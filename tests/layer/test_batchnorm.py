"""SyncBatchNorm on W gloo ranks equals nn.BatchNorm*d on the concatenated batch.

Outputs, input gradients, the sum over ranks of weight/bias gradients and the running statistics
(on every rank) are compared after each of several training steps, then in eval mode.
"""

from __future__ import annotations

import pytest
import torch

from syncbn.testing.scenarios import Case, check_against_reference, run_sync_bn

BATCHES = (3, 2, 4, 1)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("spatial", [(), (5,), (3, 4), (2, 3, 2)], ids=["1d-NC", "1d", "2d", "3d"])
def test_matches_batchnorm_float64(run_ranks, world_size, spatial):
    case = Case(batch_sizes=BATCHES[:world_size], spatial=spatial)
    check_against_reference(run_ranks(run_sync_bn, world_size, case), case)


@pytest.mark.parametrize(
    "case",
    [
        Case(batch_sizes=(3, 5), dtype=torch.float32),
        Case(batch_sizes=(3, 5), dtype=torch.bfloat16),
        Case(batch_sizes=(3, 5), dtype=torch.float16),
        Case(batch_sizes=(4, 0, 2)),  # an empty rank still takes part in every collective
        Case(batch_sizes=(0, 3), dtype=torch.float32),
        Case(batch_sizes=(1, 1), spatial=()),  # one value per rank, two globally
        Case(batch_sizes=(2, 6, 1), momentum=None),
        Case(batch_sizes=(2, 3), affine=False),
        Case(batch_sizes=(2, 3), track_running_stats=False),
        Case(batch_sizes=(2, 3), momentum=None, affine=False),
        Case(batch_sizes=(2, 3), memory_format=torch.channels_last, dtype=torch.float32),
        Case(batch_sizes=(2, 3), spatial=(2, 3, 2), memory_format=torch.channels_last_3d),
        Case(batch_sizes=(2, 3, 1, 4), group_size=2),  # each pair equals BN on its own batch
        Case(batch_sizes=(2, 0, 1, 4), group_size=2, momentum=None),
    ],
    ids=lambda c: (
        f"W{len(c.batch_sizes)}-{c.batch_sizes}-{str(c.dtype)[6:]}-mom{c.momentum}"
        f"-aff{int(c.affine)}-trs{int(c.track_running_stats)}-{str(c.memory_format)[6:]}"
        f"-g{c.group_size}"
    ),
)
def test_matches_batchnorm(run_ranks, case):
    check_against_reference(run_ranks(run_sync_bn, len(case.batch_sizes), case), case)
