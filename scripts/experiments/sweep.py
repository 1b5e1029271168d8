"""What the sweeps of train.py runs share (compare_norms.py, compare_seg.py): summary statistics
over seeds that count diverged runs, and results.json that stays standard JSON."""

from __future__ import annotations

import math
import statistics


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
