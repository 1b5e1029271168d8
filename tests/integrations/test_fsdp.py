"""FSDP2 (``fully_shard``) with bfloat16 parameters, and a DeviceMesh dimension as the group.

``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` gives the layer bfloat16 parameters and
input next to float32 running statistics. At every world size, including one rank (where the
layer runs unsynchronized), the statistics are float32, the running buffers stay float32, and the
result equals ``nn.BatchNorm2d`` on the global batch (the bfloat16-rounded inputs, in float64)
within bfloat16 accuracy. Runs on CPU with gloo.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn

C = 4
STEPS = 2
BATCH = (3, 5, 2, 4)


def _batch(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(BATCH[rank], C, 3, 3, generator=generator) * (1 + rank) + 2 * rank


def _fully_sharded_steps() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(C)), mesh)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    outputs = []
    for step in range(STEPS):
        y = model(_batch(rank, step))  # float32 in; FSDP casts it to bfloat16
        y.float().square().sum().backward()
        outputs.append(y.detach())
    layer = model[0]
    return {
        "outputs": outputs,
        "buffers": {name: buffer.clone() for name, buffer in layer.named_buffers()},
        "weight_grad_dtype": layer.weight.grad.dtype,
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_fully_shard_bfloat16_matches_batchnorm_on_the_global_batch(run_ranks, world_size):
    results = run_ranks(_fully_sharded_steps, world_size)

    reference = nn.BatchNorm2d(C, dtype=torch.float64)
    for step in range(STEPS):
        inputs = [_batch(r, step).bfloat16().double() for r in range(world_size)]
        expected = reference(torch.cat(inputs)).split(BATCH[:world_size])
        for rank, result in enumerate(results):
            output = result["outputs"][step]
            assert output.dtype == torch.bfloat16
            assert_close(output.double(), expected[rank].detach(), atol=3e-2, rtol=1e-2)
    for result in results:
        buffers = result["buffers"]
        assert buffers["running_mean"].dtype == buffers["running_var"].dtype == torch.float32
        assert int(buffers["num_batches_tracked"]) == STEPS
        # Statistics in float32 from bfloat16 inputs: far tighter than bfloat16's 2^-8.
        assert_close(buffers["running_mean"].double(), reference.running_mean, atol=1e-5, rtol=0)
        assert_close(buffers["running_var"].double(), reference.running_var, atol=1e-4, rtol=1e-5)
        assert result["weight_grad_dtype"] == torch.float32  # FSDP's sharded float32 parameter


def _mesh_dimension_group() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(C)), mesh, mesh_dim="dp")
    layer = model[0]
    with pytest.raises(ValueError, match="mesh_dim"):
        syncbn.convert_sync_batchnorm(nn.BatchNorm2d(C), mesh)
    layer(_batch(rank, 0)).sum().backward()
    return {
        "ranks": dist.get_process_group_ranks(layer.process_group),
        "running_mean": layer.running_mean.clone(),
    }


def test_convert_takes_a_device_mesh_dimension_as_the_group(run_ranks):
    """On a ("dp", "tp") mesh of 4 ranks, "dp" pairs ranks {0, 2} and {1, 3}."""
    results = run_ranks(_mesh_dimension_group, 4)
    for rank, result in enumerate(results):
        members = [rank % 2, rank % 2 + 2]
        assert result["ranks"] == members
        reference = nn.BatchNorm2d(C)
        reference(torch.cat([_batch(r, 0) for r in members]))
        assert_close(result["running_mean"], reference.running_mean)
