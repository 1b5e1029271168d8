"""Under torch.utils.checkpoint the layer updates its running statistics once per step and its
recomputation in backward reuses the first forward's global statistics (no second all-reduce).

Each rank trains a checkpointed copy and an unchecked copy of one model on the same shards; both
must agree step by step (outputs, input and parameter gradients, running statistics), and
``num_batches_tracked`` must equal the number of steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

import syncbn
from syncbn.testing import cuda_standin

STEPS = 3
C = 4


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv1d(3, C, 1), syncbn.SyncBatchNorm(C), nn.ReLU(), nn.Conv1d(C, 2, 1)]
    return nn.Sequential(*layers).to(dtype)


def _batches(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    size = 3 + rank  # uneven shards that differ between ranks
    x = torch.randn(size, 3, 5, generator=generator, dtype=torch.float64) * (1 + rank) + rank
    return x, torch.randn(size, 2, 5, generator=generator, dtype=torch.float64)


def _train(model: nn.Module, use_reentrant: bool | None, sizes: list[int]) -> list[dict]:
    """STEPS SGD steps; ``use_reentrant=None``: no checkpointing. Records every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    for step in range(STEPS):
        x, dy = _batches(dist.get_rank(), step)
        dtype = next(model.parameters()).dtype
        x, dy = x.to(dtype).requires_grad_(), dy.to(dtype)
        before = len(sizes)
        if use_reentrant is None:
            y = model(x)
        else:
            y = checkpoint(model, x, use_reentrant=use_reentrant)
        forward_reductions = len(sizes) - before
        y.backward(dy)
        records.append(
            {
                "y": y.detach(),
                "dx": x.grad,
                "grads": [p.grad.clone() for p in model.parameters()],
                "state": copy.deepcopy(model[1].state_dict()),
                "forward_reductions": forward_reductions,
                "reductions": len(sizes) - before,
            }
        )
        optimizer.step()
        optimizer.zero_grad()
    return records


def _count_reductions(sizes: list[int]):
    """The real all_reduce, recording each call's number of values."""
    real = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    return real, counted


def _checked_and_unchecked(use_reentrant_by_rank: list[bool | None], kernels="cpu") -> dict:
    """``kernels="triton"``: float32 through the Triton kernels (interpreted), else float64."""
    use_reentrant = use_reentrant_by_rank[dist.get_rank()]
    dtype = torch.float32 if kernels == "triton" else torch.float64
    sizes: list[int] = []
    real, counted = _count_reductions(sizes)
    dist.all_reduce = counted
    try:
        with cuda_standin.path(kernels):
            checked = _train(_model(dtype), use_reentrant, sizes)
            plain = _train(_model(dtype), None, sizes)
    finally:
        dist.all_reduce = real
    return {"checked": checked, "plain": plain}


def _assert_same_training(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        for step, (got, want) in enumerate(zip(result["checked"], result["plain"], strict=True)):
            where = f"rank {rank}, step {step}"
            assert_close(got["y"], want["y"], msg=where)
            assert_close(got["dx"], want["dx"], msg=where)
            assert_close(got["grads"], want["grads"], msg=where)
            assert_close(got["state"], want["state"], msg=where)
            assert int(got["state"]["num_batches_tracked"]) == step + 1, where
            # One forward all-reduce of 2C + 2 values, one backward one of 2C, per step.
            assert got["reductions"] == want["reductions"] == 2, where
            assert got["forward_reductions"] == 1, where


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_layer_equals_the_unchecked_one_and_reduces_once(run_ranks, use_reentrant):
    _assert_same_training(run_ranks(_checked_and_unchecked, 2, [use_reentrant, use_reentrant]))


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointing_with_the_triton_kernels(run_ranks, use_reentrant):
    """The rerun normalizes through the Triton normalize kernel with the first forward's
    statistics (a buffer made from them), and the backward is the kernels' own."""
    pytest.importorskip("triton")
    results = run_ranks(_checked_and_unchecked, 2, [use_reentrant, None], "triton")
    _assert_same_training(results)


def test_only_one_rank_checkpoints(run_ranks):
    """Rank 0 recomputes in backward, rank 1 does not: the collectives still pair up."""
    _assert_same_training(run_ranks(_checked_and_unchecked, 2, [False, None], timeout=30))


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_one_process_updates_running_statistics_once_per_step(use_reentrant):
    """Without a process group the layer is nn.BatchNorm, whose rerun updates twice; ours not."""
    checked, plain = _model(), _model()
    for step in range(STEPS):
        x, _ = _batches(0, step)
        checkpoint(checked, x.requires_grad_(), use_reentrant=use_reentrant).sum().backward()
        plain(x).sum().backward()
    assert int(checked[1].num_batches_tracked) == STEPS
    assert_close(checked[1].state_dict(), plain[1].state_dict())
    assert_close([p.grad for p in checked.parameters()], [p.grad for p in plain.parameters()])


def test_kept_statistics_are_dropped_after_a_rerun_and_bounded(run_ranks):
    run_ranks(_kept_entries, 2)


def _kept_entries() -> None:
    from syncbn.recompute import MAX_KEPT

    model = _model()
    layer = model[1]
    x, _ = _batches(dist.get_rank(), 0)
    model(x).sum().backward()  # no checkpoint: nothing to keep
    assert not layer.__dict__.get("_recompute_kept")
    checkpoint(model, x.requires_grad_(), use_reentrant=False).sum().backward()
    assert not layer._recompute_kept  # consumed by the rerun
    with torch.no_grad():  # train-mode forwards that nobody recomputes
        for _ in range(MAX_KEPT + 3):
            model(x)
    assert len(layer._recompute_kept) == MAX_KEPT
