"""The CUDA/NCCL path: equivalence with nn.BatchNorm*d, and CUDA graph capture of a training step.

These need two GPUs (NCCL allows one rank per GPU) and skip cleanly anywhere else, CI included.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn
from tests.scenarios import Case, run_sync_bn, to_cpu
from tests.test_batchnorm import check_against_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one NCCL rank per GPU)"
    ),
]

CASES = {
    "2d_float32": Case((3, 5), spatial=(4, 5), dtype=torch.float32),
    "uneven_float64_momentum_none": Case((1, 6), dtype=torch.float64, momentum=None),
    "empty_rank": Case((0, 4), dtype=torch.float32),
    "channels_last_half": Case(
        (4, 2), spatial=(3, 3), dtype=torch.float16, memory_format=torch.channels_last
    ),
    "bfloat16_3d": Case((2, 3), spatial=(2, 3, 2), dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", CASES)
def test_nccl_matches_batchnorm_on_the_global_batch(worker_pool, tmp_path, name):
    case = CASES[name]
    results = worker_pool.run(
        run_sync_bn, 2, tmp_path, Case(**{**vars(case), "device": "cuda"}), backend="nccl"
    )
    check_against_reference(results, case)


def _cnn(device) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        syncbn.SyncBatchNorm(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        syncbn.SyncBatchNorm(8, momentum=None),
        nn.Flatten(),
    ).to(device)


def _step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    y.square().sum().backward()
    return y


def _graphed_training_step(empty_rank: int | None) -> dict:
    """Capture forward + backward in a CUDA graph, replay it on new data, compare with eager."""
    rank = dist.get_rank()
    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    graphed = _cnn(device)
    eager = copy.deepcopy(graphed)
    batch = 0 if rank == empty_rank else 4
    gen = torch.Generator(device=device).manual_seed(rank)
    inputs = [torch.randn(batch, 3, 6, 6, device=device, generator=gen) for _ in range(6)]
    static_x = inputs[0].clone()

    side = torch.cuda.Stream()  # warm up (NCCL communicators, cuDNN plans) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in inputs[:3]:
            graphed.zero_grad(set_to_none=True)
            eager.zero_grad(set_to_none=True)
            _step(graphed, x)
            _step(eager, x)
    torch.cuda.current_stream().wait_stream(side)

    graphed.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = _step(graphed, static_x)

    records = []
    for x in inputs[3:]:
        static_x.copy_(x)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        y = _step(eager, x)
        torch.cuda.synchronize()
        records.append(
            {
                "graphed": [static_y.clone()]
                + [p.grad.clone() for p in graphed.parameters()]
                + [b.clone() for b in graphed.buffers()],
                "eager": [y.detach()]
                + [p.grad.clone() for p in eager.parameters()]
                + [b.clone() for b in eager.buffers()],
            }
        )
    return to_cpu(records)


@pytest.mark.parametrize("empty_rank", [None, 1], ids=["full", "empty_rank"])
def test_cuda_graph_replay_matches_eager(worker_pool, tmp_path, empty_rank):
    """A captured step (momentum 0.1 and None, one rank possibly empty) replays exactly: no
    host synchronization anywhere in SyncBN's forward or backward, or capture would fail."""
    results = worker_pool.run(_graphed_training_step, 2, tmp_path, empty_rank, backend="nccl")
    for rank, records in enumerate(results):
        for replay, record in enumerate(records):
            assert_close(record["graphed"], record["eager"], msg=f"rank {rank}, replay {replay}")
