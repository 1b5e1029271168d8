"""What the global batch can be: empty, far from zero, and ranks that disagree about the layer.

Every case runs on real gloo ranks, on the CPU path and on the CUDA branch (through
``syncbn/testing/cuda_standin.py``), against ``nn.BatchNorm`` on the concatenated batch or the
behaviour PyTorch specifies (pytorch#36530: an empty batch gives an empty output, zero parameter
gradients and untouched running statistics).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn.testing import cuda_standin

PATHS = ["cpu", "cuda_branch"]


_path = cuda_standin.path


def _empty_global_batch(path: str, momentum, shape) -> dict:
    with _path(path):
        torch.manual_seed(0)
        bn = syncbn.SyncBatchNorm(shape[1], momentum=momentum)
        with torch.no_grad():  # non-trivial running statistics and parameters
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        x = torch.randn(shape, requires_grad=True)
        y = bn(x)
        y.sum().backward()
        return {
            "y_shape": tuple(y.shape),
            "x_grad_shape": tuple(x.grad.shape),
            "weight_grad": bn.weight.grad,
            "bias_grad": bn.bias.grad,
            "before": before,
            "after": {k: v.clone() for k, v in bn.state_dict().items()},
        }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 5)], ids=["NCHW", "NC"])
def test_empty_global_batch_is_like_batchnorm(run_ranks, path, momentum, shape):
    """Every rank empty (a detector head with no proposals anywhere): an empty output, zero
    parameter gradients, running statistics untouched, num_batches_tracked counted, as
    nn.BatchNorm does with an empty batch; no error and no NaN."""
    reference = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
    reference(torch.randn(shape, requires_grad=True)).sum().backward()
    for result in run_ranks(_empty_global_batch, 3, path, momentum, shape):
        assert result["y_shape"] == result["x_grad_shape"] == shape
        assert_close(result["weight_grad"], torch.zeros(shape[1]), rtol=0, atol=0)
        assert_close(result["bias_grad"], torch.zeros(shape[1]), rtol=0, atol=0)
        assert_close(reference.weight.grad, torch.zeros(shape[1]), rtol=0, atol=0)
        before, after = result["before"], result["after"]
        for key in ("running_mean", "running_var", "weight", "bias"):
            assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
        assert int(after["num_batches_tracked"]) == int(before["num_batches_tracked"]) + 1
        assert int(reference.num_batches_tracked) == 1  # nn.BatchNorm counts it too


def _empty_then_full(path: str) -> dict:
    """An empty global step between two real ones leaves the statistics where the real steps
    put them, on every rank alike."""
    with _path(path):
        rank = dist.get_rank()
        bn = syncbn.SyncBatchNorm(3, momentum=None)
        gen = torch.Generator().manual_seed(rank)
        for batch in (4, 0, 2):
            bn(torch.randn(batch, 3, 2, generator=gen)).sum().backward()
        return {k: v.clone() for k, v in bn.state_dict().items()}


@pytest.mark.parametrize("path", PATHS)
def test_empty_global_step_between_real_ones(run_ranks, path):
    ranks = run_ranks(_empty_then_full, 2, path)
    reference = nn.BatchNorm1d(3, momentum=None)
    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    for batch in (4, 0, 2):
        reference(torch.cat([torch.randn(batch, 3, 2, generator=g) for g in gens]))
    for state in ranks:
        for key, value in reference.state_dict().items():
            assert_close(state[key], value, msg=key)


def _gen_for(rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(100 * rank + step)


def _far_from_zero(path: str, offset: float, load_mean: bool) -> dict:
    """float64 input at |mean| / std = offset. The merge centres on the running mean, which a
    loaded (pretrained) layer already has near the data and a fresh one reaches in one step with
    momentum 1."""
    with _path(path):
        rank = dist.get_rank()
        bn = syncbn.SyncBatchNorm(2, momentum=1.0, dtype=torch.float64)
        if load_mean:
            bn.running_mean.fill_(offset)
        outputs = []
        for step in range(2):
            x = torch.randn(5, 2, 3, generator=_gen_for(rank, step), dtype=torch.float64)
            outputs.append(bn(x + offset).detach())
        return {"outputs": outputs, "running_var": bn.running_var.clone()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("offset", [1e7, 1e8])
def test_float64_far_from_zero_is_exact_once_the_running_mean_is_near(run_ranks, path, offset):
    for load_mean in (True, False):
        results = run_ranks(_far_from_zero, 2, path, offset, load_mean)
        for step in range(2) if load_mean else [1]:  # a fresh layer: exact from step 2
            x = (
                torch.cat(
                    [
                        torch.randn(5, 2, 3, generator=_gen_for(r, step), dtype=torch.float64)
                        for r in range(2)
                    ]
                )
                + offset
            )
            # nn.BatchNorm's two-pass statistics, in float64
            var, mean = torch.var_mean(x, [0, 2], correction=0, keepdim=True)
            expected = (x - mean) / torch.sqrt(var + 1e-5)
            got = torch.cat([r["outputs"][step] for r in results])
            # float64 holds x ~ 1e8 to 1.5e-8: that is the outputs' floor
            assert_close(got, expected, rtol=0, atol=1e-6, msg=f"load={load_mean} step={step}")
        unbiased = torch.var(x, [0, 2])
        for r in results:
            assert_close(r["running_var"], unbiased, rtol=1e-6, atol=0)


def _mixed_layers(path: str, group_size: int | None) -> str:
    """Two layers of the same width, run in a different order on different ranks: without the
    signature check their buffers would add up into wrong statistics on both, with no error."""
    with _path(path):
        rank = dist.get_rank()
        group = syncbn.new_sync_group(group_size) if group_size else None
        model = syncbn.convert_sync_batchnorm(
            nn.ModuleDict({"stem": nn.BatchNorm1d(4), "head": nn.BatchNorm1d(4)}),
            process_group=group,
        )
        if group_size == 2:  # each group agrees internally; the groups differ
            order = ["stem", "head"] if rank < 2 else ["head", "stem"]
        else:
            order = ["stem", "head"] if rank % 2 == 0 else ["head", "stem"]
        try:
            h = torch.randn(6, 4)
            for name in order:
                h = model[name](h)
            h.sum().backward()
        except RuntimeError as error:
            return str(error)
        return "no error"


@pytest.mark.parametrize("path", PATHS)
def test_ranks_at_different_layers_of_the_same_width_fail_naming_the_layer(run_ranks, path):
    errors = run_ranks(_mixed_layers, 2, path, None)
    if path == "cpu":
        assert "SyncBatchNorm layer 'stem' expected every rank" in errors[0], errors[0]
        assert "SyncBatchNorm layer 'head' expected every rank" in errors[1], errors[1]
        assert all("SYNCBN_DEBUG=1" in e for e in errors)
    else:  # the CUDA branch checks on device: torch._assert_async (fatal on a GPU)
        assert all("ranks at different layers" in e for e in errors), errors


def test_groups_that_each_agree_may_run_different_layers(run_ranks):
    """The signature is checked within each layer's group: groups of 2 on 4 ranks running the
    layers in different orders are fine."""
    assert run_ranks(_mixed_layers, 4, "cpu", 2) == ["no error"] * 4


def _empty_rank_input_without_grad(path: str) -> dict:
    """A detector head: rank 1 has no proposals and builds its empty input from nothing (no
    grad), rank 0's input comes from a layer (grad). The layer's weight needs a gradient on both,
    so both run its backward; both must run the backward collective, or rank 0 waits forever."""
    with _path(path):
        rank = dist.get_rank()
        torch.manual_seed(0)
        conv, bn = nn.Linear(3, 3), syncbn.SyncBatchNorm(3)
        if rank == 0:
            x = conv(torch.randn(5, 3))
        else:
            x = torch.zeros(0, 3)  # requires_grad=False
        bn(x).square().sum().backward()
        return {"weight_grad": bn.weight.grad.clone()}


@pytest.mark.parametrize("path", PATHS)
def test_ranks_may_disagree_about_the_input_needing_a_gradient(run_ranks, path):
    results = run_ranks(_empty_rank_input_without_grad, 2, path, timeout=20)
    assert_close(results[1]["weight_grad"], torch.zeros(3), rtol=0, atol=0)
    assert results[0]["weight_grad"].abs().sum() > 0
