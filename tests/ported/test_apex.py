"""SyncBatchNorm cases ported from NVIDIA/apex's synced_batchnorm tests.

Sources, in ``tests/distributed/synced_batchnorm/``: ``single_gpu_unit_test.py``,
``python_single_gpu_unit_test.py``, ``two_gpu_unit_test.py`` (run by ``unit_test.sh``),
``two_gpu_test_different_batch_size.py``, ``test_groups.py``, ``test_batchnorm1d.py``. The
float64 closed-form references are apex's formulas (``syncbn.testing.scenarios.closed_form``).

How the cases are ported, and what every file shares: :mod:`tests.ported.common`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import syncbn
from syncbn.testing.scenarios import closed_form
from tests.ported.common import PATHS, kernel_path, rank_rows, seeded, state_copy


def _apex_data(shape, seed: int, dtype=torch.float32):
    gen = seeded(seed)
    inp = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    return inp, grad, weight, bias


APEX_SINGLE_SHAPE = (5, 10, 16, 16)


def _apex_single(path: str, force_sync: bool):
    with kernel_path(path):
        inp, grad, weight, bias = _apex_data(APEX_SINGLE_SHAPE, 1)
        records = {}
        for fmt in (torch.contiguous_format, torch.channels_last):
            sbn = syncbn.SyncBatchNorm(10, momentum=1.0)
            sbn._always_sync = force_sync
            with torch.no_grad():
                sbn.weight.copy_(weight)
                sbn.bias.copy_(bias)
            x = inp.clone(memory_format=fmt).requires_grad_()
            y = sbn(x)
            y.backward(grad.contiguous(memory_format=fmt))
            _, mean, var, _ = syncbn.sync_batch_norm(inp, weight, bias)
            records[str(fmt)] = {
                "y": y.detach(),
                "grad_input": x.grad,
                "grad_weight": sbn.weight.grad,
                "grad_bias": sbn.bias.grad,
                "running_mean": sbn.running_mean.clone(),
                "running_var": sbn.running_var.clone(),
                "mean": mean,
                "var": var,
            }
        return records


@pytest.mark.parametrize("path, force_sync", [("cpu", False), ("cpu", True), ("cuda_branch", True)])
def test_apex_single_rank_againstclosed_form(run_ranks, path, force_sync):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/single_gpu_unit_test.py and
    python_single_gpu_unit_test.py: one process, input (5, 10, 16, 16), momentum 1.0; mean,
    biased variance, output, input/weight/bias gradients and running statistics (unbiased
    variance) against apex's float64 closed-form formulas, within apex's 1e-5; and the same with
    a channel-last layout (apex's ``channel_last=True``: here a channels_last tensor). Run on a
    one-rank group both as it is (the layer is ``nn.BatchNorm``) and with the synchronized path
    forced (``_always_sync``); mean and variance come from ``syncbn.sync_batch_norm``."""
    results = run_ranks(_apex_single, 1, path, force_sync)[0]
    inp, grad, weight, bias = _apex_data(APEX_SINGLE_SHAPE, 1)
    ref = closed_form(inp, grad, weight, bias)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for fmt, r in results.items():
        for key, expected in [
            ("mean", ref["mean"]),
            ("var", ref["var"]),
            ("y", ref["y"]),
            ("grad_input", ref["grad_input"]),
            ("grad_weight", ref["grad_weight"]),
            ("grad_bias", ref["grad_bias"]),
            ("running_mean", ref["mean"]),
            ("running_var", ref["unbiased_var"]),
        ]:
            assert_close(r[key].double(), expected, **tol, msg=f"{fmt}: {key}")


APEX_TWO_SHAPE = (16, 10, 12, 12)
APEX_ERROR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.float64: 1e-8}


def _apex_two(path: str, dtype_name: str):
    with kernel_path(path):
        rank, world = dist.get_rank(), dist.get_world_size()
        dtype = getattr(torch, dtype_name)
        inp, grad, weight, bias = _apex_data(APEX_TWO_SHAPE, 18, dtype)
        n = APEX_TWO_SHAPE[0]
        rows = slice(rank * n // world, (rank + 1) * n // world)
        sbn = syncbn.SyncBatchNorm(10, momentum=1.0).to(dtype)
        with torch.no_grad():
            sbn.weight.copy_(weight)
            sbn.bias.copy_(bias)
        _, mean, var, _ = syncbn.sync_batch_norm(inp[rows], weight, bias)
        return {"mean": mean, "var": var, **_one_ddp_sgd_step(sbn, inp[rows], grad[rows])}


def _one_ddp_sgd_step(sbn, x, grad) -> dict:
    """apex's step: the layer under DDP over the whole world, one backward of ``grad``, SGD with
    lr 1.0; the layer's output, input gradient, running statistics and parameters after it."""
    ddp = DDP(sbn)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    x = x.clone().requires_grad_()
    y = ddp(x)
    y.backward(grad)
    opt.step()
    return {
        "y": y.detach(),
        "grad_input": x.grad,
        "running_mean": sbn.running_mean.clone(),
        "running_var": sbn.running_var.clone(),
        "weight": sbn.weight.detach().clone(),
        "bias": sbn.bias.detach().clone(),
    }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "float64"])
def test_apex_two_ranks_againstclosed_form(run_ranks, dtype_name, path):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/two_gpu_unit_test.py (run by
    unit_test.sh in fp32 and ``--fp16``; ``--fp64`` exists too): the batch split in two
    consecutive halves, parameters and input in the dtype (``model.half()``/``.double()``),
    momentum 1.0, DDP and one SGD step with lr 1.0; global mean and biased variance, each rank's
    output and input gradient, running statistics and the parameters after the step (BN's
    gradient divided by the world size, apex's compensation for DDP's averaging) against the
    float64 closed form, with apex's errors (1e-5, 1e-3, 1e-8 as rtol and atol). Shrunk from
    (32, 10, 40, 40) to (16, 10, 12, 12)."""
    world = 2
    dtype = getattr(torch, dtype_name)
    results = run_ranks(_apex_two, world, path, dtype_name)
    inp, grad, weight, bias = _apex_data(APEX_TWO_SHAPE, 18, dtype)
    ref = closed_form(inp, grad, weight, bias)
    err = APEX_ERROR[dtype]
    tol = {"rtol": err, "atol": err}
    n = APEX_TWO_SHAPE[0]
    for rank, r in enumerate(results):
        rows = slice(rank * n // world, (rank + 1) * n // world)
        checks = [
            ("mean", ref["mean"]),
            ("var", ref["var"]),
            ("y", ref["y"][rows]),
            ("grad_input", ref["grad_input"][rows]),
            ("running_mean", ref["mean"]),
            ("running_var", ref["unbiased_var"]),
            ("weight", weight.double() - ref["grad_weight"] / world),
            ("bias", bias.double() - ref["grad_bias"] / world),
        ]
        for key, expected in checks:
            assert_close(r[key].double(), expected, **tol, msg=f"rank {rank}: {key}")


def _apex_conv_model() -> nn.Module:
    torch.manual_seed(2809)
    return nn.Sequential(nn.Conv2d(3, 6, 3, 1, 1), nn.BatchNorm2d(6))


def _apex_diff_batch_data(sizes):
    gen = seeded(2809)
    x = [
        torch.randn(n, 3, 8, 8, generator=gen) * (50.0 if r == 0 else 1.0)
        for r, n in enumerate(sizes)
    ]
    g = [torch.randint(0, 10, (n, 6, 8, 8), generator=gen).float() / 10.0 for n in sizes]
    return x, g


def _apex_diff_batch(path: str, sizes):
    with kernel_path(path):
        rank, world = dist.get_rank(), dist.get_world_size()
        ddp = DDP(syncbn.convert_sync_batchnorm(_apex_conv_model()))
        xs, gs = _apex_diff_batch_data(sizes)
        x = xs[rank].clone().requires_grad_()
        out = ddp(x)
        out.backward(gs[rank] * world / sum(sizes))  # apex's weighted_gradient
        bn = ddp.module[1]
        return {
            "y": out.detach(),
            "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone(),
            "bn_weight_grad": bn.weight.grad.clone(),
            "conv_weight_grad": ddp.module[0].weight.grad.clone(),
        }


@pytest.mark.parametrize("path", PATHS)
def test_apex_two_ranks_different_batch_sizes(run_ranks, path):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/
    two_gpu_test_different_batch_size.py: Conv2d(3, 6) then SyncBN(6) under DDP, rank 0 with 16
    images scaled by 50 and rank 1 with 8; the upstream gradient weighted by W/N so that DDP's
    average is the gradient of the whole batch. Output, running statistics, BN weight gradient
    (1e-6) and conv weight gradient (1e-5) against the same model on the concatenated batch."""
    sizes = (16, 8)
    results = run_ranks(_apex_diff_batch, 2, path, sizes)
    model = _apex_conv_model()
    xs, gs = _apex_diff_batch_data(sizes)
    out = model(torch.cat(xs))
    out.backward(torch.cat(gs) / sum(sizes))
    tol = {"rtol": 1e-5, "atol": 1e-5}
    assert_close(torch.cat([r["y"] for r in results]), out.detach(), **tol)
    for r in results:
        assert_close(r["running_mean"], model[1].running_mean, **tol)
        assert_close(r["running_var"], model[1].running_var, **tol)
        assert_close(r["bn_weight_grad"], model[1].weight.grad, rtol=1e-6, atol=1e-6)
        assert_close(r["conv_weight_grad"], model[0].weight.grad, **tol)


APEX_GROUP_SHAPE = (8, 10, 6, 6)


def _apex_group_data(group_id: int):
    """apex seeds the data by group (18 + local_rank // group_size); the parameters here come
    from one seed on every rank (apex's differ per group until DDP broadcasts rank 0's)."""
    inp, grad, _, _ = _apex_data(APEX_GROUP_SHAPE, 18 + group_id)
    _, _, weight, bias = _apex_data(APEX_GROUP_SHAPE, 99)
    return inp, grad, weight, bias


def _apex_groups(path: str, group_size: int):
    with kernel_path(path):
        rank = dist.get_rank()
        group = syncbn.new_sync_group(group_size)
        inp, grad, weight, bias = _apex_group_data(rank // group_size)
        n = APEX_GROUP_SHAPE[0]
        local = rank % group_size
        rows = slice(local * n // group_size, (local + 1) * n // group_size)
        sbn = syncbn.SyncBatchNorm(10, momentum=1.0, process_group=group)
        with torch.no_grad():
            sbn.weight.copy_(weight)
            sbn.bias.copy_(bias)
        return _one_ddp_sgd_step(sbn, inp[rows], grad[rows])  # DDP over the whole world


@pytest.mark.parametrize("path", PATHS)
def test_apex_process_groups(run_ranks, path):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/test_groups.py (group_size=2
    on 4 processes): each group of 2 consecutive ranks normalizes its own batch (data seeded by
    group), DDP averages gradients over all 4 ranks, momentum 1.0, one SGD step with lr 1.0.
    Each rank's output and input gradient and its group's running statistics against the float64
    closed form of its group's batch (apex's 1e-5); the parameters after the step move by the
    world average of both groups' gradients (apex's bn-vs-sbn comparison). Shrunk from
    (32, 10, 40, 40) to (8, 10, 6, 6)."""
    world, group_size = 4, 2
    results = run_ranks(_apex_groups, world, path, group_size)
    n = APEX_GROUP_SHAPE[0]
    tol = {"rtol": 1e-5, "atol": 1e-5}
    refs = [closed_form(*_apex_group_data(g)) for g in range(world // group_size)]
    _, _, weight, bias = _apex_group_data(0)
    for rank, r in enumerate(results):
        ref = refs[rank // group_size]
        local = rank % group_size
        rows = slice(local * n // group_size, (local + 1) * n // group_size)
        for key, expected in [
            ("y", ref["y"][rows]),
            ("grad_input", ref["grad_input"][rows]),
            ("running_mean", ref["mean"]),
            ("running_var", ref["unbiased_var"]),
            ("weight", weight.double() - sum(f["grad_weight"] for f in refs) / world),
            ("bias", bias.double() - sum(f["grad_bias"] for f in refs) / world),
        ]:
            assert_close(r[key].double(), expected, **tol, msg=f"rank {rank}: {key}")


def _apex_1d(path: str):
    with kernel_path(path):
        rank = dist.get_rank()
        model = syncbn.SyncBatchNorm(4)
        with torch.no_grad():
            model.weight.uniform_(generator=seeded(1))
            model.bias.uniform_(generator=seeded(2))
        initial = state_copy(model)
        data = torch.rand(8, 4, generator=seeded(3))
        out = model(data[rank_rows((4, 4), rank)])
        return initial, out.detach(), state_copy(model)


@pytest.mark.parametrize("path", PATHS)
def test_apex_batchnorm1d(run_ranks, path):
    """Ported from NVIDIA/apex tests/distributed/synced_batchnorm/test_batchnorm1d.py: a
    SyncBatchNorm(4) with uniform weight and bias on (8, 4) input (here split over 2 ranks);
    ``nn.BatchNorm1d`` loaded with its state_dict gives the same output and running
    statistics."""
    results = run_ranks(_apex_1d, 2, path)
    reference = nn.BatchNorm1d(4)
    reference.load_state_dict(results[0][0])
    expected = reference(torch.rand(8, 4, generator=seeded(3)))
    assert_close(torch.cat([r[1] for r in results]), expected.detach())
    for _, _, state in results:
        for key, value in reference.state_dict().items():
            assert_close(state[key], value, msg=key)
