"""scripts/experiments/compare_seg.py without running anything: the plan of runs and the summary
of results (the runs themselves are train.py's, tested elsewhere; the sweep takes ~45 minutes)."""

from __future__ import annotations

from argparse import Namespace

from tests.support.scripts import load_experiment

compare_seg = load_experiment("compare_seg", "sweep")


def test_the_plan_shares_references_of_equal_global_batch_and_bn_at_one_image_drops_pool_norm():
    runs = compare_seg.plan(Namespace(seeds=3, world_sizes=[2, 4], batch_sizes=[1, 2, 4]))
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 96
    references = sorted({r.global_batch for r in runs if r.label == compare_seg.REFERENCE})
    assert references == [2, 4, 8, 16]  # 2 x 2 and 4 x 1 share the global batch of 4
    for run in runs:
        if run.norm == "bn" and run.world_size > 1 and run.batch_size == 1:
            assert compare_seg.NO_POOL_NORM in run.overrides  # the only way BN trains there


def _record(label, w, b, seed, miou, overrides=()):
    return {"label": label, "world_size": w, "batch_size": b, "global_batch": w * b,
            "seed": seed, "overrides": list(overrides), "val_miou": miou, "val_acc": 0.9,
            "val_loss": 0.2, "train_loss_end": 0.1}  # fmt: skip


def test_the_summary_puts_references_under_every_matching_point_and_one_bn_run_under_two_labels():
    records = [
        _record(compare_seg.REFERENCE, 1, 4, 0, 0.30),
        _record(compare_seg.REFERENCE, 1, 4, 1, 0.50),
        _record(compare_seg.BN, 2, 1, 0, 0.2, (compare_seg.NO_POOL_NORM,)),
        _record(compare_seg.SYNCBN, 4, 1, 0, 0.25),
    ]
    summary = compare_seg.summarize(records, [2, 4], [1, 2])
    keys = {(g["world_size"], g["batch_size"], g["label"]): g for g in summary}
    for point in [(2, 2), (4, 1)]:  # global batch 4 on both world sizes
        stat = keys[(*point, compare_seg.REFERENCE)]["val_miou"]
        assert stat["mean"] == 0.4 and abs(stat["std"] - 0.1414) < 1e-3 and stat["n"] == 2
    assert (2, 2, compare_seg.REFERENCE) in keys and (4, 4, compare_seg.REFERENCE) not in keys
    assert (
        keys[(2, 1, compare_seg.BN)]["val_miou"] == keys[(2, 1, compare_seg.BN_NO_POOL)]["val_miou"]
    )
    assert not keys[(2, 1, compare_seg.BN)]["image_pool_norm"]
    table = compare_seg.format_table(
        {"world_sizes": [2, 4], "batch_sizes": [1, 2], "summary": summary}
    )
    assert "| 2 | 1 |" in table and "0.200 ± 0.000*" in table
