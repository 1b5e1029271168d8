"""precise_bn on W = 1, 2, 3 gloo ranks with uneven shards equals float64 statistics of the data.

The reference for a layer is the mean and unbiased variance, per channel, of everything that
reached its input on all ranks (for the first layer: the dataset itself), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn

SAMPLES = 23
BATCH = 4
SHARDS = {1: [(0, 23)], 2: [(0, 15), (15, 23)], 3: [(0, 11), (11, 14), (14, 23)]}


def _dataset() -> torch.Tensor:
    """Per-channel offsets far above the spread: naive float32 sums of squares would fail."""
    gen = torch.Generator().manual_seed(3)
    scale = torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    return (
        torch.randn(SAMPLES, 3, 4, 4, generator=gen, dtype=torch.float64) * scale + 1000
    ).float()


def _shard(world_size: int, rank: int) -> list[torch.Tensor]:
    start, stop = SHARDS[world_size][rank]
    return list(_dataset()[start:stop].split(BATCH))


def _model(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    )  # fmt: skip
    return syncbn.convert_sync_batchnorm(model) if sync else model


def _precise_rank(sync: bool, num_batches: int | list[int] | None):
    """``num_batches``: one for all ranks, one per rank, or None for ``len(loader)`` per rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = _shard(world, rank)
    if num_batches is None:
        num_batches = len(loader)
    elif isinstance(num_batches, list):
        num_batches = num_batches[rank]
    model = _model(sync).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    seen: dict[int, list[torch.Tensor]] = {}  # every input each BN layer received
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for i, layer in enumerate(layers):
        record = lambda _, args, i=i: seen.setdefault(i, []).append(args[0].double())  # noqa: E731
        layer.register_forward_pre_hook(record)
    syncbn.precise_bn(model, loader, num_batches)
    state = model.state_dict()
    return {
        "inputs": {i: torch.cat(xs) for i, xs in seen.items()},
        "state": state,
        "unchanged": all(torch.equal(state[k], v) for k, v in weights.items()),
        "training": [m.training for m in model.modules()],
    }


def _bn_states(state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    prefixes = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith("running_mean")})
    return [(state[f"{p}.running_mean"], state[f"{p}.running_var"]) for p in prefixes]


@pytest.mark.parametrize("sync", [True, False], ids=["syncbn", "bn"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_population_statistics_over_all_ranks(run_ranks, world_size, sync):
    results = run_ranks(_precise_rank, world_size, sync, 100)
    first = _bn_states(results[0]["state"])
    for layer, (mean, var) in enumerate(first):
        inputs = torch.cat([r["inputs"][layer] for r in results])
        values = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)  # (C, every value)
        assert values.shape[1] == SAMPLES * 16  # every sample of every shard, once
        assert_close(mean.double(), values.mean(1), rtol=1e-6, atol=1e-6)
        assert_close(var.double(), values.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
    data = _dataset().double()  # the first layer's input is the data itself
    assert_close(first[0][0].double(), data.mean((0, 2, 3)), rtol=1e-7, atol=0)
    assert_close(first[0][1].double(), data.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=0)
    for r in results:
        assert r["unchanged"], "weights or num_batches_tracked changed"
        assert not any(r["training"]), "eval mode was not restored"
        for key, value in results[0]["state"].items():
            assert torch.equal(r["state"][key], value), f"{key} differs between ranks"


def _assert_population_statistics(results, samples: int) -> None:
    """Every rank holds the mean and unbiased variance of all its layers' inputs on all ranks."""
    for layer, (mean, var) in enumerate(_bn_states(results[0]["state"])):
        inputs = torch.cat([r["inputs"][layer] for r in results])
        values = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)  # (C, every value)
        assert values.shape[1] == samples * 16
        assert_close(mean.double(), values.mean(1), rtol=1e-6, atol=1e-6)
        assert_close(var.double(), values.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
    for r in results:
        for key, value in results[0]["state"].items():
            assert torch.equal(r["state"][key], value), f"{key} differs between ranks"


@pytest.mark.parametrize("sync", [True, False], ids=["syncbn", "bn"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_num_batches_len_loader_differs_between_ranks(run_ranks, world_size, sync):
    """``num_batches=len(loader)`` on uneven shards: 4 vs 2 (W=2), 3, 1, 3 (W=3) batches.

    This killed a rank with SIGABRT in gloo (each rank's lockstep loop ran its own number of
    times, so one rank reached the pooling all-reduce while another was still stepping).
    """
    results = run_ranks(_precise_rank, world_size, sync, None)
    _assert_population_statistics(results, SAMPLES)
    first = _bn_states(results[0]["state"])[0]
    data = _dataset().double()
    assert_close(first[0].double(), data.mean((0, 2, 3)), rtol=1e-7, atol=0)


@pytest.mark.parametrize("sync", [True, False], ids=["syncbn", "bn"])
def test_num_batches_per_rank_below_and_above_what_the_shard_holds(run_ranks, sync):
    """Rank 0 stops after 1 of its 4 batches, rank 1 wants 3 but holds 2: 4 + 8 samples."""
    results = run_ranks(_precise_rank, 2, sync, [1, 3])
    _assert_population_statistics(results, 4 + 8)
    mean, var = _bn_states(results[0]["state"])[0]
    data = torch.cat([_dataset()[:4], _dataset()[15:23]]).double()
    assert_close(mean.double(), data.mean((0, 2, 3)), rtol=1e-7, atol=0)
    assert_close(var.double(), data.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=0)


def test_num_batches_limits_each_rank(run_ranks):
    result = run_ranks(_precise_rank, 1, False, 2)[0]
    mean, var = _bn_states(result["state"])[0]
    data = _dataset()[: 2 * BATCH].double()
    assert_close(mean.double(), data.mean((0, 2, 3)), rtol=1e-7, atol=0)
    assert_close(var.double(), data.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=0)


def _masked_rank():
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(10 + rank)
    layer = syncbn.SyncBatchNorm(3).double()
    batches = []
    for _ in range(3):
        x = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64) * 2 + 5
        mask = torch.randint(0, 7, (4,), generator=gen)[:, None] > torch.arange(6)
        batches.append((x.masked_fill(~mask[:, None], 1e9), mask))
    syncbn.precise_bn(layer, batches, 3, forward=lambda model, b: model(b[0], b[1]))
    real = torch.cat([x.movedim(1, -1)[mask] for x, mask in batches])  # (real elements, C)
    return {"real": real, "mean": layer.running_mean, "var": layer.running_var}


def test_masked_elements_are_left_out(run_ranks):
    results = run_ranks(_masked_rank, 2)
    real = torch.cat([r["real"] for r in results])
    for r in results:
        assert_close(r["mean"], real.mean(0), rtol=1e-12, atol=1e-12)
        assert_close(r["var"], real.var(0, unbiased=True), rtol=1e-12, atol=1e-12)


def _ddp_rank():
    """A plain-BN model under DDP (a forward that broadcasts buffers) with len(loader) per rank."""
    loader = _shard(2, dist.get_rank())
    model = nn.parallel.DistributedDataParallel(_model(False))
    syncbn.precise_bn(model, loader, len(loader))
    return _bn_states(model.module.state_dict())


def test_ddp_model_with_num_batches_len_loader_differing_between_ranks(run_ranks):
    results = run_ranks(_ddp_rank, 2)
    data = _dataset().double()
    for states in results:
        mean, var = states[0]
        assert_close(mean.double(), data.mean((0, 2, 3)), rtol=1e-7, atol=0)
        assert_close(var.double(), data.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=0)
        for (m0, v0), (m, v) in zip(results[0], states, strict=True):
            assert torch.equal(m0, m) and torch.equal(v0, v)


def _empty_shard_rank(sync: bool):
    """Rank 1 of 2 holds no batch at all (``num_batches=len(loader)=0`` there)."""
    rank = dist.get_rank()
    loader = _shard(2, 0) if rank == 0 else []
    model = _model(sync)
    try:
        syncbn.precise_bn(model, loader, len(loader))
    except ValueError as error:
        return str(error)
    return [stats for stats in _bn_states(model.state_dict())]


def test_rank_without_batches_all_ranks_raise_the_same_error_when_the_model_syncs(run_ranks):
    messages = run_ranks(_empty_shard_rank, 2, True)
    assert messages[0] == messages[1]
    assert "expected at least one batch on every rank" in messages[0]
    assert "got none on rank(s) [1]" in messages[0]


def test_rank_without_batches_contributes_nothing_when_the_model_does_not_sync(run_ranks):
    results = run_ranks(_empty_shard_rank, 2, False)
    data = _dataset()[:15].double()  # rank 0's shard only
    for mean, var in (results[0][0], results[1][0]):
        assert_close(mean.double(), data.mean((0, 2, 3)), rtol=1e-7, atol=0)
        assert_close(var.double(), data.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=0)


def test_bad_arguments():
    for bad in (-1, 2.0, True):
        with pytest.raises(
            ValueError, match=rf"expected num_batches to be an integer >= 0 \(got {bad}\)"
        ):
            syncbn.precise_bn(_model(False), [torch.zeros(2, 3, 4, 4)], bad)
    with pytest.warns(UserWarning, match="left 3 BN layer"):
        syncbn.precise_bn(_model(False), [torch.zeros(2, 3, 4, 4)], 0)
    with pytest.raises(TypeError, match=r"batches that are a tensor.*\(got str\)"):
        syncbn.precise_bn(_model(False), ["not a batch"], 1)


def _mixed_modes(sync: bool) -> nn.Module:
    """An eval-mode dropout inside a model in training mode, and one training BN layer inside
    an eval-mode block: no single ``train(flag)`` call, nor parents after children, restores it."""
    model = _model(sync).eval()
    model[2].train()
    block = nn.Sequential(nn.Dropout(0.5), model).train()
    block[0].eval()
    return block


@pytest.mark.parametrize("sync", [True, False], ids=["syncbn", "bn"])
def test_every_module_keeps_its_own_mode(sync):
    model = _mixed_modes(sync)
    modes = [m.training for m in model.modules()]
    assert any(modes) and not all(modes)
    syncbn.precise_bn(model, _shard(1, 0), 2)
    assert [m.training for m in model.modules()] == modes

    def broken(model, batch):  # and when a forward raises: the modes come back all the same
        model(batch)
        raise RuntimeError("a forward failed")

    with pytest.raises(RuntimeError, match="a forward failed"):
        syncbn.precise_bn(model, _shard(1, 0), 2, forward=broken)
    assert [m.training for m in model.modules()] == modes
