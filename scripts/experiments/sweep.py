"""What the sweeps of train.py runs share (compare_norms.py, compare_seg.py): launching one run
(resumable), summary statistics over seeds that count diverged runs, and results.json that stays
standard JSON."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_train(run_dir: Path, world_size: int, overrides: list[str]) -> dict:
    """train.py on ``world_size`` ranks (torchrun; one process for one rank) with ``overrides``,
    in ``run_dir``; its metrics.json. A run that finished before is not run again, and one that
    was interrupted resumes (``trainer.resume=auto``)."""
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text())
    prefix = [sys.executable]
    if world_size > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={world_size}"]  # fmt: skip
    cmd = [*prefix, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", "trainer.progress=false",
           "trainer.resume=auto", "logger.mode=disabled", *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not metrics.exists():
        raise RuntimeError(
            f"{run_dir.name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(metrics.read_text())


def mean_std(values: list[float]) -> dict:
    """Mean and sample std of the finite values; runs that diverged (NaN/Inf) are counted."""
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else None,
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "n": len(values),
        "diverged": len(values) - len(finite),
    }


def json_safe(value):
    """NaN/Inf (a diverged run) as null, so results.json is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
