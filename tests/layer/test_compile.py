"""SyncBatchNorm under ``torch.compile(fullgraph=True)`` on 2 gloo ranks matches eager mode.

Compiling costs tens of seconds per process on this CPU, so the ranks compile once, in one task
for the whole module, and the tests below read its record: a small CNN trained for two steps
(synchronized forward and backward, SGD, running statistics with momentum 0.1 and None), eval
mode, and an MLP whose second rank holds an empty batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn

pytestmark = pytest.mark.slow

FLOAT32 = {"rtol": 1e-4, "atol": 1e-5}  # float32 round-off: inductor fuses and reorders sums


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        syncbn.SyncBatchNorm(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        syncbn.SyncBatchNorm(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _mlp() -> nn.Module:
    # Linear layers: inductor's CPU convolution backward itself fails on an empty batch (a
    # PyTorch bug with no SyncBN involved), so the empty-rank case uses an MLP.
    # Two SyncBN layers: on an empty rank, the first one's backward collective is fed by the
    # second one's input gradient.
    return nn.Sequential(
        nn.Linear(6, 8),
        syncbn.SyncBatchNorm(8),
        nn.ReLU(),
        nn.Linear(8, 8),
        syncbn.SyncBatchNorm(8, momentum=None),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def _train_twice(
    model: nn.Module,
    batches: list[torch.Tensor],
    eval_batch: torch.Tensor | None = None,
    *,
    reduce_grads: bool = True,
) -> dict:
    """Two SGD steps (gradients summed over ranks, as DDP would, unless ``reduce_grads`` is off:
    one process), then an eval pass on ``eval_batch`` (default: the first batch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = {"outputs": [], "grads": []}
    model.train()
    for x in batches:
        x = x.clone().requires_grad_()
        y = model(x)
        (y.square().sum() / 7).backward()
        if reduce_grads:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        record["outputs"].append(y.detach())
        record["grads"].append([x.grad] + [p.grad.clone() for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    record["buffers"] = [b.clone() for b in model.buffers()]
    model.eval()
    with torch.no_grad():
        record["eval"] = model(batches[0] if eval_batch is None else eval_batch)
    return record


def _eager_and_compiled(build, batches) -> tuple[dict, dict]:
    torch.manual_seed(0)
    eager = build()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    return _train_twice(eager, batches), _train_twice(compiled, batches)


def _compile_scenarios() -> dict:
    rank = dist.get_rank()
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(10 + rank)
    images = [torch.randn(3, 3, 6, 6, generator=gen) * 2 + 1 for _ in range(2)]
    mlp_batch = 0 if rank == 1 else 5
    vectors = [torch.randn(mlp_batch, 6, generator=gen) for _ in range(2)]
    return {
        "cnn": _eager_and_compiled(_cnn, images),
        "mlp_with_empty_rank": _eager_and_compiled(_mlp, vectors),
        "inputs": {"cnn": images, "mlp_with_empty_rank": vectors},
        "empty_global_batch": _compiled_empty_global_batch(),
    }


def _compiled_empty_global_batch() -> dict:
    """Every rank empty, compiled with fullgraph=True: then a real step on the same layer."""
    torch.manual_seed(0)
    bn = syncbn.SyncBatchNorm(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
    before = [bn.running_mean.clone(), bn.running_var.clone()]
    compiled = torch.compile(bn, fullgraph=True)
    y = compiled(torch.zeros(0, 4, requires_grad=True))
    y.sum().backward()
    record = {
        "shape": tuple(y.shape),
        "before": before,
        "after": [bn.running_mean.clone(), bn.running_var.clone()],
        "grads": [bn.weight.grad.clone(), bn.bias.grad.clone()],
    }
    gen = torch.Generator().manual_seed(dist.get_rank())
    compiled(torch.randn(3, 4, generator=gen)).sum().backward()
    return {**record, "running_mean": bn.running_mean.clone()}


@pytest.fixture(scope="module")
def compiled_records(worker_pool, tmp_path_factory):
    return worker_pool.run(_compile_scenarios, 2, tmp_path_factory.mktemp("compile"), timeout=400)


@pytest.mark.parametrize("scenario", ["cnn", "mlp_with_empty_rank"])
@pytest.mark.parametrize("part", ["outputs", "grads", "buffers", "eval"])
def test_compiled_fullgraph_matches_eager(compiled_records, scenario, part):
    for rank, record in enumerate(compiled_records):
        eager, compiled = record[scenario]
        assert_close(compiled[part], eager[part], **FLOAT32, msg=f"rank {rank}, {part}")


def test_compiled_training_actually_synchronized(compiled_records):
    """The compiled runs' running statistics agree across ranks, whose data differ: the graph
    really reduced over the group rather than normalizing each rank's batch alone."""
    for scenario in ("cnn", "mlp_with_empty_rank"):
        rank0, rank1 = (record[scenario][1]["buffers"] for record in compiled_records)
        assert_close(rank0[0], rank1[0], msg=f"{scenario}: running_mean differs across ranks")
        assert_close(rank0[1], rank1[1], msg=f"{scenario}: running_var differs across ranks")


def _reference(build, per_rank_batches: list[list[torch.Tensor]]) -> dict:
    """The same model with nn.BatchNorm, trained in one process on each step's concatenated
    batch (the loss summed over ranks' shares, as the ranks' all-reduced gradients are), then
    evaluated on each rank's first batch."""
    torch.manual_seed(0)
    model = syncbn.revert_sync_batchnorm(build())
    steps = [torch.cat([batches[step] for batches in per_rank_batches]) for step in range(2)]
    first = [batches[0] for batches in per_rank_batches]
    record = _train_twice(model, steps, torch.cat(first), reduce_grads=False)
    record["eval"] = list(record["eval"].split([len(b) for b in first]))
    return record


@pytest.mark.parametrize("scenario, build", [("cnn", _cnn), ("mlp_with_empty_rank", _mlp)])
def test_compiled_matches_batchnorm_on_the_concatenated_batch(compiled_records, scenario, build):
    """An independent reference for the compiled runs: nn.BatchNorm in one process."""
    reference = _reference(build, [r["inputs"][scenario] for r in compiled_records])
    compiled = [r[scenario][1] for r in compiled_records]
    for step in range(2):
        got = torch.cat([c["outputs"][step] for c in compiled])
        assert_close(got, reference["outputs"][step], **FLOAT32, msg=f"outputs, step {step}")
        x_grad = torch.cat([c["grads"][step][0] for c in compiled])
        assert_close(x_grad, reference["grads"][step][0], **FLOAT32, msg=f"input grad {step}")
        for c in compiled:  # parameter gradients were all-reduced: every rank holds the total
            assert_close(c["grads"][step][1:], reference["grads"][step][1:], **FLOAT32)
    for rank, c in enumerate(compiled):
        assert_close(c["buffers"], reference["buffers"], **FLOAT32, msg=f"buffers, rank {rank}")
        assert_close(c["eval"], reference["eval"][rank], **FLOAT32, msg=f"eval, rank {rank}")


def test_empty_global_batch_compiles_and_leaves_running_stats(compiled_records):
    """Every rank empty under torch.compile: an empty output, running statistics untouched,
    zero parameter gradients (as nn.BatchNorm), and the next real step still synchronizes."""
    records = [r["empty_global_batch"] for r in compiled_records]
    for r in records:
        assert r["shape"] == (0, 4)
        assert_close(r["after"], r["before"], rtol=0, atol=0)
        assert_close(r["grads"], [torch.zeros(4), torch.zeros(4)], rtol=0, atol=0)
    assert_close(records[0]["running_mean"], records[1]["running_mean"])
