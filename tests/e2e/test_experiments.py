"""Smoke tests of the two MLP experiments, ``scripts/experiments/gradient_flow.py`` and
``scripts/experiments/bn_figure1.py``: each script runs end to end in ``--quick`` mode (a few
steps, 2 spawned gloo ranks), and what the full runs rely on holds: vanishing gradients without BN
at initialization, and SyncBN on 2 x 30 computing what BN on 1 x 60 computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.scripts import load_experiment

ROOT = Path(__file__).resolve().parents[2]


def _run_quick(script: str, tmp_path: Path) -> tuple[dict, Path]:
    out = tmp_path / script
    path = ROOT / "scripts" / "experiments" / f"{script}.py"
    cmd = [sys.executable, str(path), "--quick", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out


@pytest.mark.slow
def test_gradient_flow_quick(tmp_path):
    report, out = _run_quick("gradient_flow", tmp_path)
    assert (out / "gradient_flow.png").stat().st_size > 0
    summary = report["summary"]
    assert list(summary) == ["none", "bn", "syncbn"]
    assert all(len(r["grad_norms"][0]) == report["depth"] for r in report["runs"])
    # 16 sigmoid layers with PyTorch's default init: without BN the first layer's gradient is
    # ~1e-12 of the last hidden layer's; with BN (per rank or synchronized) of the same order.
    assert summary["none"]["ratio_at"]["0"] < 1e-6
    for norm in ("bn", "syncbn"):
        assert 0.1 < summary[norm]["ratio_at"]["0"] < 10


@pytest.mark.slow
def test_bn_figure1_quick(tmp_path):
    report, out = _run_quick("bn_figure1", tmp_path)
    assert (out / "bn_figure1.png").stat().st_size > 0
    runs = {r["label"]: r for r in report["runs"]}
    assert len(runs) == 5
    # The same global batches of 60: SyncBN on 2 x 30 follows BN on 1 x 60, and DDP without BN
    # follows one process, step for step up to round-off ...
    agreement = report["agreement"]
    assert agreement["SyncBN, 2 x 30 vs BN, 1 x 60"]["max_loss_diff_all_steps"] < 1e-4
    assert agreement["no BN, 2 x 30 vs no BN, 1 x 60"]["max_loss_diff_all_steps"] < 1e-4
    # ... while per-rank BN (statistics of 30) does not: the comparison above can fail.
    assert agreement["per-rank BN, 2 x 30 vs BN, 1 x 60"]["max_loss_diff_all_steps"] > 1e-3
    # (b, c): 15/50/85th percentiles of the plotted sigmoid's input at every evaluation, and the
    # drift of all 100 sigmoids of the last hidden layer.
    run = runs["SyncBN, 2 x 30"]
    assert len(run["unit_percentiles"]) == len(run["steps"]) == len(run["test_acc"])
    assert all(p15 <= p50 <= p85 for p15, p50, p85 in run["unit_percentiles"])
    assert len(run["drift"]) == len(run["late_drift"]) == 100


def test_bad_arguments_are_rejected_before_any_work(capsys):
    bn_figure1 = load_experiment("bn_figure1", "mlplib")
    gradient_flow = load_experiment("gradient_flow", "mlplib")

    with pytest.raises(SystemExit):
        bn_figure1.parse_args(["--unit", "100"])
    assert "--unit expected a sigmoid in [0, 100) (got 100)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gradient_flow.parse_args(["--snapshots", "7"])
    assert "--snapshots expected steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gradient_flow.parse_args(["--depth", "2"])
    assert "--depth expected at least 3" in capsys.readouterr().err
