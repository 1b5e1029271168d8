"""SyncBatchNorm cases ported from open-mmlab/mmcv's ``tests/test_ops/test_syncbn.py``.

Sources: ``test_syncbn_1/2/4`` and ``test_syncbn_empty_1/2/4``, with their ``_half`` variants
(``_test_syncbn_train``, ``_test_syncbn_empty_train``).

How the cases are ported, and what every file shares: :mod:`tests.ported.common`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn
from tests.ported.common import PATHS, kernel_path, seeded

MMCV_WEIGHT = torch.tensor([0.2, 0.5, 0.7])


def _mmcv_data(rows: int, half: bool):
    gen = seeded(9)
    x = torch.rand(rows, 3, 2, 3, generator=gen)
    y_bp = torch.rand(rows, 3, 2, 3, generator=gen)
    return (x.half(), y_bp.half()) if half else (x, y_bp)


def _mmcv_train(path: str, half: bool, rows: int):
    with kernel_path(path):
        rank = dist.get_rank()
        x, y_bp = _mmcv_data(rows, half)
        local = slice(rank * 4, rank * 4 + 4)
        results = {}
        for size in (1, 2, 4):
            group = syncbn.new_sync_group(size)
            sbn = syncbn.SyncBatchNorm(3, process_group=group)  # float32: mixed with half input
            with torch.no_grad():
                sbn.weight.copy_(MMCV_WEIGHT)
            sx = x[local].clone().requires_grad_()
            sy = sbn(sx)
            sy.backward(y_bp[local])
            param_grads = []
            for p in (sbn.weight, sbn.bias):  # what DDP within the group makes of them
                g = p.grad.clone()
                if size > 1:
                    dist.all_reduce(g, group=group)
                param_grads.append(g / size)
            results[size] = {
                "y": sy.detach(),
                "x_grad": sx.grad,
                "w_grad": param_grads[0],
                "b_grad": param_grads[1],
                "running_mean": sbn.running_mean.clone(),
                "running_var": sbn.running_var.clone(),
            }
        return results


def _check_mmcv(results, rows: int, half: bool):
    x, y_bp = _mmcv_data(rows, half)
    x, y_bp = x.float(), y_bp.float()
    for size in (1, 2, 4):
        for rank, r in enumerate(results):
            r = r[size]
            group = rank // size
            per = 4 * size
            gx = x[group * per : (group + 1) * per].clone().requires_grad_()
            bn = nn.BatchNorm2d(3)
            with torch.no_grad():
                bn.weight.copy_(MMCV_WEIGHT)
            y = bn(gx)
            y.backward(y_bp[group * per : (group + 1) * per])
            mine = slice((rank % size) * 4, (rank % size) * 4 + 4)
            where = f"group size {size}, rank {rank}"
            tol = {"rtol": 1e-3, "atol": 1e-8}
            assert_close(r["running_mean"], bn.running_mean, **tol, msg=where)
            assert_close(r["running_var"], bn.running_var, **tol, msg=where)
            assert_close(r["y"].float(), y.detach()[mine], **tol, msg=where)
            assert_close(r["w_grad"], bn.weight.grad / size, **tol, msg=where)
            assert_close(r["b_grad"], bn.bias.grad / size, **tol, msg=where)
            assert_close(r["x_grad"].float(), gx.grad[mine], rtol=1e-2, atol=1e-8, msg=where)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_mmcv_syncbn_groups_of_1_2_4(run_ranks, half, path):
    """Ported from open-mmlab/mmcv tests/test_ops/test_syncbn.py, ``test_syncbn_1/2/4`` and
    ``test_syncbn_1/2/4_half`` (``_test_syncbn_train``): 4 ranks with 4 images each of a shared
    (16, 3, 2, 3) batch, synchronized in groups of 1, 2 and 4, weight (0.2, 0.5, 0.7), float32
    parameters with float32 or float16 input; running statistics, outputs, parameter and input
    gradients against ``nn.BatchNorm2d`` on the group's batch with mmcv's tolerances (rtol 1e-3,
    input gradient 1e-2). mmcv's layer all-reduces the weight and bias gradients and divides by
    the group size; ours keeps each rank's share, as ``nn.SyncBatchNorm`` does, and DDP's
    averaging gives the same number: here that average is taken over the group and compared with
    mmcv's expectation (BN's gradient / group size)."""
    _check_mmcv(run_ranks(_mmcv_train, 4, path, half, 16), 16, half)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_mmcv_syncbn_empty_groups_of_1_2_4(run_ranks, half, path):
    """Ported from open-mmlab/mmcv tests/test_ops/test_syncbn.py, ``test_syncbn_empty_1/2/4``
    and their ``_half`` variants (``_test_syncbn_empty_train``, mmcv's ``stats_mode='N'``): every
    rank empty, groups of 1, 2 and 4; like ``nn.BatchNorm2d`` on the empty batch: empty output
    and input gradient, zero parameter gradients, running statistics untouched."""
    _check_mmcv(run_ranks(_mmcv_train, 4, path, half, 0), 0, half)
