"""SyncBatchNorm cases ported from facebookresearch/fairscale's
``tests/experimental/nn/test_sync_batchnorm.py``.

Sources: ``parity1d_bn``, ``parity2d_bn``, ``parity3d_bn`` (one rank) and ``parity1d_syncbn``,
``parity2d_syncbn``, ``parity3d_syncbn`` (under DDP).

How the cases are ported, and what every file shares: :mod:`tests.ported.common`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import syncbn
from tests.ported.common import PATHS, kernel_path, reference_bn, state_copy

FAIRSCALE_SHAPES = [(4, 3, 4), (4, 3, 4, 4), (4, 3, 4, 4, 4)]


def _fairscale_single(path: str, force_sync: bool):
    with kernel_path(path):
        torch.manual_seed(dist.get_rank())
        records = []
        for shape in FAIRSCALE_SHAPES:
            x = torch.randn(shape)
            yh = torch.randn_like(x)
            sides = {}
            for name, bn in (("torch", reference_bn(len(shape), 3)), ("ours", None)):
                if bn is None:
                    bn = syncbn.SyncBatchNorm(3)
                    bn._always_sync = force_sync
                xx = x.detach().clone().requires_grad_()
                y = bn(xx)
                y.backward(yh)
                sides[name] = {
                    "y": y.detach(),
                    "x_grad": xx.grad,
                    "weight_grad": bn.weight.grad,
                    "bias_grad": bn.bias.grad,
                    **state_copy(bn),
                }
            records.append(sides)
        return records


@pytest.mark.parametrize("path, force_sync", [("cpu", False), ("cpu", True), ("cuda_branch", True)])
def test_fairscale_parity_with_batchnorm_on_one_rank(run_ranks, path, force_sync):
    """Ported from facebookresearch/fairscale tests/experimental/nn/test_sync_batchnorm.py,
    ``parity1d_bn``, ``parity2d_bn``, ``parity3d_bn`` (``world_size=1``): in a one-rank process
    group the layer matches ``BatchNorm1d/2d/3d`` on (4, 3, 4[, 4[, 4]]) input: output, running
    statistics, weight and bias gradients (``allclose`` defaults) and input gradient (atol 1e-7).
    Run as it is (then it is ``nn.BatchNorm``) and with the synchronized path forced."""
    for i, sides in enumerate(run_ranks(_fairscale_single, 1, path, force_sync)[0]):
        ours, ref = sides["ours"], sides["torch"]
        for key, value in ref.items():
            tol = {"rtol": 1e-5, "atol": 1e-7 if key == "x_grad" else 1e-8}
            assert_close(ours[key], value, **tol, msg=f"{FAIRSCALE_SHAPES[i]}: {key}")


def _fairscale_data(rank: int, shape, scaled: bool):
    torch.manual_seed(rank)
    x = torch.randn(shape) * (rank if scaled else 1)
    return x, torch.randn_like(x)


def _fairscale_ddp(path: str):
    with kernel_path(path):
        rank = dist.get_rank()
        records = []
        for shape, scaled in zip(FAIRSCALE_SHAPES, (False, True, True), strict=True):
            x, yh = _fairscale_data(rank, shape, scaled)
            ddp = DDP(syncbn.SyncBatchNorm(3))
            xx = x.clone().requires_grad_()
            y = ddp(xx)
            y.backward(yh)
            bn = ddp.module
            records.append(
                {
                    "y": y.detach(),
                    "x_grad": xx.grad,
                    "weight_grad": bn.weight.grad,
                    "bias_grad": bn.bias.grad,
                    "running_mean": bn.running_mean.clone(),
                    "running_var": bn.running_var.clone(),
                }
            )
        return records


@pytest.mark.parametrize("path", PATHS)
def test_fairscale_parity_under_ddp(run_ranks, path):
    """Ported from facebookresearch/fairscale tests/experimental/nn/test_sync_batchnorm.py,
    ``parity1d_syncbn``, ``parity2d_syncbn``, ``parity3d_syncbn``: under DDP, input
    ``randn(shape) * rank`` (so rank 0 holds only zeros; not scaled for 1d) and a random upstream
    gradient. The source compares with ``nn.SyncBatchNorm`` (CUDA only); here with
    ``nn.BatchNorm*d`` on the concatenated batch, gradients averaged over ranks as DDP does:
    output and running statistics (``allclose`` defaults), input and parameter gradients (atol
    1e-6: the source compares two CUDA kernels of one algorithm; against ``nn.BatchNorm``'s CPU
    summation order a weight gradient of 0.0137, a sum of 16 terms of size 1, differs by
    2.7e-7)."""
    world = 2
    results = run_ranks(_fairscale_ddp, world, path)
    for i, (shape, scaled) in enumerate(zip(FAIRSCALE_SHAPES, (False, True, True), strict=True)):
        data = [_fairscale_data(r, shape, scaled) for r in range(world)]
        x = torch.cat([d[0] for d in data]).requires_grad_()
        bn = reference_bn(len(shape), 3)
        y = bn(x)
        y.backward(torch.cat([d[1] for d in data]))
        tol = {"rtol": 1e-5, "atol": 1e-8}
        where = str(shape)
        assert_close(torch.cat([r[i]["y"] for r in results]), y.detach(), **tol, msg=where)
        assert_close(
            torch.cat([r[i]["x_grad"] for r in results]), x.grad, rtol=1e-5, atol=1e-6, msg=where
        )
        for r in results:
            assert_close(r[i]["running_mean"], bn.running_mean, **tol, msg=where)
            assert_close(r[i]["running_var"], bn.running_var, **tol, msg=where)
            gtol = {"rtol": 1e-5, "atol": 1e-6}
            assert_close(r[i]["weight_grad"], bn.weight.grad / world, **gtol, msg=where)
            assert_close(r[i]["bias_grad"], bn.bias.grad / world, **gtol, msg=where)
