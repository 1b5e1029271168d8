"""BNTelemetry on real gloo ranks: global count and local-vs-global drift, computed directly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncbn

EPS = 1e-5


def _batch(rank: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rank)
    scale = torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1)
    return (torch.randn(n, 3, 2, 2, generator=gen, dtype=torch.float64) + rank) * scale


def _model() -> nn.Module:
    return syncbn.convert_sync_batchnorm(
        nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    ).double()


def _telemetry_rank(batch_sizes):
    rank = dist.get_rank()
    model = _model()
    telemetry = syncbn.BNTelemetry(model)
    model(_batch(rank, batch_sizes[rank]))  # not armed: nothing recorded
    unarmed = telemetry.collect()
    telemetry.arm()
    model(_batch(rank, batch_sizes[rank]))
    model(_batch(rank + 10, batch_sizes[rank]))  # only the first forward after arm() counts
    metrics = telemetry.collect()
    return {"unarmed": unarmed, "metrics": metrics, "summary": telemetry.summary(metrics)}


def _expected_first_layer(batch_sizes):
    """Drift of each rank holding data against the statistics of the concatenated batch."""
    batches = [_batch(r, n) for r, n in enumerate(batch_sizes)]
    everything = torch.cat(batches)
    mean = everything.mean((0, 2, 3))
    var = everything.var((0, 2, 3), unbiased=False)
    drifts = []
    for x in batches:
        if len(x) == 0:
            continue
        local_mean, local_var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        d_mean = ((local_mean - mean) ** 2 / (var + EPS)).mean().sqrt()
        d_var = (((local_var + EPS) / (var + EPS) - 1) ** 2).mean().sqrt()
        drifts.append((d_mean.item(), d_var.item()))
    return everything.numel() / 3, drifts


@pytest.mark.parametrize("batch_sizes", [(4, 4), (5, 0, 2)], ids=["even", "empty-rank"])
def test_drift_and_global_count_equal_direct_computation(run_ranks, batch_sizes):
    results = run_ranks(_telemetry_rank, len(batch_sizes), batch_sizes)
    count, drifts = _expected_first_layer(batch_sizes)
    for r in results:
        assert r["unarmed"] == {}
        m = r["metrics"]
        assert m == results[0]["metrics"], "ranks report different metrics"
        assert m["bn/0/global_count"] == count
        assert m["bn/0/mean_drift"] == pytest.approx(sum(d for d, _ in drifts) / len(drifts))
        assert m["bn/0/var_drift"] == pytest.approx(sum(v for _, v in drifts) / len(drifts))
        assert m["bn/0/mean_drift_max"] == pytest.approx(max(d for d, _ in drifts))
        assert m["bn/0/var_drift_max"] == pytest.approx(max(v for _, v in drifts))
        assert m["bn/0/mean_drift"] > 0.3  # ranks are offset by one unit: real drift
        assert {"bn/2/mean_drift", "bn/mean_drift", "bn/var_drift"} <= m.keys()
        assert r["summary"].startswith(f"bn telemetry: 2 layers, global batch {count:.0f}-")


def test_overall_metrics_are_the_mean_over_layers_and_the_worst_rank_of_the_worst_layer(
    run_ranks,
):
    """Uneven batches (6 and 1 samples): the rank with one sample drifts more, so the worst
    rank's drift is above the mean over ranks, in each layer and over all layers."""
    metrics = run_ranks(_telemetry_rank, 2, (6, 1))[0]["metrics"]
    _, drifts = _expected_first_layer((6, 1))
    per_layer = {
        key: [metrics[f"bn/{layer}/{key}"] for layer in ("0", "2")]
        for key in ("mean_drift", "var_drift", "mean_drift_max")
    }
    assert metrics["bn/mean_drift"] == pytest.approx(sum(per_layer["mean_drift"]) / 2)
    assert metrics["bn/var_drift"] == pytest.approx(sum(per_layer["var_drift"]) / 2)
    assert metrics["bn/mean_drift_max"] == pytest.approx(max(per_layer["mean_drift_max"]))
    worst_rank = max(d for d, _ in drifts)
    assert worst_rank > 1.2 * sum(d for d, _ in drifts) / 2  # the worst rank and the mean differ
    assert metrics["bn/mean_drift_max"] >= worst_rank - 1e-12


def _telemetry_in_groups_of_one() -> dict:
    """2 ranks whose layers each sync over a group of one: the normalization batch is the local
    batch, so the drift against it is zero and the global count is the local one (a telemetry
    that pooled over the world would see the other rank's batch, offset by one unit)."""
    rank = dist.get_rank()
    group = syncbn.new_sync_group(1)
    model = syncbn.convert_sync_batchnorm(
        nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), group
    ).double()
    telemetry = syncbn.BNTelemetry(model, process_group=group)
    telemetry.arm()
    model(_batch(rank, 6))
    return telemetry.collect()


def test_drift_is_measured_against_the_layers_own_group(run_ranks):
    for metrics in run_ranks(_telemetry_in_groups_of_one, 2):
        assert metrics["bn/0/global_count"] == 6 * 4
        assert metrics["bn/mean_drift"] == pytest.approx(0, abs=1e-12)
        assert metrics["bn/var_drift"] == pytest.approx(0, abs=1e-12)


def test_eval_forwards_are_not_recorded():
    model = _model().eval()
    telemetry = syncbn.BNTelemetry(model)
    telemetry.arm()
    model(_batch(0, 6))
    assert telemetry.collect() == {}
    assert "no SyncBatchNorm layer ran" in telemetry.summary({})
