"""Bad input gets a clear error naming the layer, what was expected and what was got."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from syncbn import SyncBatchNorm, distributed, new_sync_group


@pytest.mark.parametrize(
    ("x", "error", "pattern"),
    [
        (
            torch.randn(4),
            ValueError,
            r"SyncBatchNorm expected input of at least 2 .*got 1D",
        ),
        (torch.randn(2, 3, 5), ValueError, r"expected input with 4 channels in dim 1 \(got 3"),
        (
            torch.ones(2, 4, dtype=torch.int64),
            TypeError,
            r"floating-point input .*int64",
        ),
        (
            torch.randn(2, 4, dtype=torch.float64),
            TypeError,
            r"input of dtype torch.float32",
        ),
    ],
    ids=["rank1", "channels", "integer", "float64-vs-float32-params"],
)
@pytest.mark.parametrize("training", [True, False])
def test_bad_input(x, error, pattern, training):
    bn = SyncBatchNorm(4).train(training)
    with pytest.raises(error, match=pattern):
        bn(x)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_features": 0}, r"num_features to be a positive integer \(got 0\)"),
        ({"num_features": 2.5}, r"num_features to be a positive integer \(got 2.5\)"),
        ({"num_features": 3, "momentum": 1.5}, r"momentum in \[0, 1\] or None \(got 1.5\)"),
        ({"num_features": 3, "eps": -1.0}, r"eps >= 0 \(got -1.0\)"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SyncBatchNorm(**kwargs)


def test_helpers_without_process_group():
    assert not distributed.is_initialized()
    assert (distributed.get_world_size(), distributed.get_rank()) == (1, 0)
    assert distributed.is_group_member(None) and new_sync_group(4) is None
    with pytest.raises(ValueError, match=r"positive integer group_size \(got 0\)"):
        new_sync_group(0)


def _use_foreign_group() -> str:
    group = dist.new_group([0, 1])  # collective: every rank creates it
    try:
        SyncBatchNorm(2, process_group=group)(torch.randn(3, 2))
    except ValueError as error:
        return str(error)
    return "ok"


def test_rank_outside_its_process_group(run_ranks):
    messages = run_ranks(_use_foreign_group, 3)
    assert messages[:2] == ["ok", "ok"]
    assert "expected this rank to be a member of its process_group (got rank 2" in messages[2]


def _sync_groups(size: int):
    try:
        group = new_sync_group(size)
    except ValueError as error:
        return str(error)
    return distributed.group_ranks(group)


def test_new_sync_group(run_ranks):
    assert run_ranks(_sync_groups, 4, 2) == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert run_ranks(_sync_groups, 4, 4) == [[0, 1, 2, 3]] * 4
    errors = run_ranks(_sync_groups, 4, 3)
    assert all(
        "group_size to divide the world size 4 (got 3); choose one of [1, 2, 4]" in e
        for e in errors
    )
