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


def _precise_rank(sync: bool, num_batches: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(sync).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    seen: dict[int, list[torch.Tensor]] = {}  # every input each BN layer received
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for i, layer in enumerate(layers):
        record = lambda _, args, i=i: seen.setdefault(i, []).append(args[0].double())  # noqa: E731
        layer.register_forward_pre_hook(record)
    syncbn.precise_bn(model, _shard(world, rank), num_batches)
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


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"expected num_batches >= 1 \(got 0\)"):
        syncbn.precise_bn(_model(False), [torch.zeros(2, 3, 4, 4)], 0)
    with pytest.raises(TypeError, match=r"batches that are a tensor.*\(got str\)"):
        syncbn.precise_bn(_model(False), ["not a batch"], 1)
