"""SyncBatchNorm on W gloo ranks equals nn.BatchNorm*d on the concatenated batch.

Outputs, input gradients, the sum over ranks of weight/bias gradients and the running statistics
(on every rank) are compared after each of several training steps, then in eval mode.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tests.scenarios import LR, Case, run_reference, run_sync_bn

TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 2e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 3e-2},
    torch.float16: {"rtol": 2e-3, "atol": 3e-3},
}


def check_against_reference(results: list[dict], case: Case) -> None:
    tol = TOLERANCES[case.dtype]
    state_tol = TOLERANCES[case.param_dtype]
    for group_id, members in enumerate(case.groups()):
        ref = run_reference(case, group_id, members)
        drift = {"weight": 0.0, "bias": 0.0}  # bound on the SGD-updated parameters' error so far
        for step, ref_step in enumerate(ref["steps"]):
            ranks = [results[r]["steps"][step] for r in members]
            where = f"group {group_id}, step {step}"
            assert_close(torch.cat([r["y"] for r in ranks]), ref_step["y"], **tol, msg=_at(where))
            assert_close(torch.cat([r["dx"] for r in ranks]), ref_step["dx"], **tol, msg=_at(where))
            assert all(r["channels_last"] for r in ranks), "output lost the input memory format"
            if case.affine:
                for key in ("dw", "db"):
                    total = torch.stack([r[key].to(ref_step[key].dtype) for r in ranks]).sum(0)
                    if _half_precision_reduction(case):
                        bound = _summation_error_bound(case, ref_step[f"{key}_abs"])
                        _assert_within(total, ref_step[key], bound, f"{key}, {where}")
                        drift["weight" if key == "dw" else "bias"] += LR * bound
                    else:
                        assert_close(total, ref_step[key], **state_tol, msg=_at(f"{key}, {where}"))
            for rank_step in ranks:
                assert rank_step["state"].keys() == ref_step["state"].keys()
                for key, value in ref_step["state"].items():
                    ours = rank_step["state"][key].to(value.dtype)  # half parameters: as float
                    if key in drift and _half_precision_reduction(case):  # w -= LR * dw
                        bound = drift[key] + state_tol["atol"] + state_tol["rtol"] * value.abs()
                        _assert_within(ours, value, bound, f"{key}, {where}")
                    else:
                        assert_close(ours, value, **state_tol, msg=_at(f"{key}, {where}"))
        if case.track_running_stats:  # eval normalizes with the (global) running statistics
            for r in members:
                assert_close(results[r]["eval"], ref["eval"], **tol)


def _half_precision_reduction(case: Case) -> bool:
    r"""Whether the parameter gradients come from PyTorch's fused CUDA reduction of half-precision
    input (``batch_norm_backward_reduce``). Its NCHW kernel rounds every product
    :math:`g (x - \mu)` and the partial sums of its tree reduction to the input's dtype
    (``Float2(scalar_t, scalar_t)`` in Normalization.cuh), so float32 parameters do not get
    float32 gradients: torch.nn.SyncBatchNorm computes them with the same kernel."""
    return case.device.startswith("cuda") and case.dtype in (torch.float16, torch.bfloat16)


def _summation_error_bound(case: Case, absolute_terms: torch.Tensor) -> torch.Tensor:
    r"""Per channel, the textbook bound on a pairwise sum of :math:`n` terms rounded to a
    precision of unit roundoff :math:`u`: :math:`(\lceil \log_2 n \rceil + 2)\, u \sum_i |t_i|`
    (one rounding per tree level, plus those of each product and of a half-precision result);
    :math:`u` of the input's dtype, :math:`n` the values per channel on the largest rank."""
    per_channel = max(case.batch_sizes) * math.prod(case.spatial)
    roundoff = torch.finfo(case.dtype).eps / 2
    return (math.ceil(math.log2(max(per_channel, 2))) + 2) * roundoff * absolute_terms


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, where: str) -> None:
    error = (actual.double() - expected.double()).abs()
    assert (error <= bound).all(), (
        f"{where}: error {error.tolist()} exceeds the half-precision summation bound "
        f"{bound.tolist()} (ours {actual.tolist()}, nn.BatchNorm {expected.tolist()})"
    )


def _at(where: str):
    """An ``assert_close`` message that keeps torch's numbers (greatest differences) after
    saying where the mismatch is."""
    return lambda details: f"{where}: {details}"


BATCHES = (3, 2, 4, 1)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("spatial", [(), (5,), (3, 4), (2, 3, 2)], ids=["1d-NC", "1d", "2d", "3d"])
def test_matches_batchnorm_float64(run_ranks, world_size, spatial):
    case = Case(batch_sizes=BATCHES[:world_size], spatial=spatial)
    check_against_reference(run_ranks(run_sync_bn, world_size, case), case)


@pytest.mark.parametrize(
    "case",
    [
        Case(batch_sizes=(3, 5), dtype=torch.float32),
        Case(batch_sizes=(3, 5), dtype=torch.bfloat16),
        Case(batch_sizes=(3, 5), dtype=torch.float16),
        Case(batch_sizes=(4, 0, 2)),  # an empty rank still takes part in every collective
        Case(batch_sizes=(0, 3), dtype=torch.float32),
        Case(batch_sizes=(1, 1), spatial=()),  # one value per rank, two globally
        Case(batch_sizes=(2, 6, 1), momentum=None),
        Case(batch_sizes=(2, 3), affine=False),
        Case(batch_sizes=(2, 3), track_running_stats=False),
        Case(batch_sizes=(2, 3), momentum=None, affine=False),
        Case(batch_sizes=(2, 3), memory_format=torch.channels_last, dtype=torch.float32),
        Case(batch_sizes=(2, 3), spatial=(2, 3, 2), memory_format=torch.channels_last_3d),
        Case(batch_sizes=(2, 3, 1, 4), group_size=2),  # each pair equals BN on its own batch
        Case(batch_sizes=(2, 0, 1, 4), group_size=2, momentum=None),
    ],
    ids=lambda c: (
        f"W{len(c.batch_sizes)}-{c.batch_sizes}-{str(c.dtype)[6:]}-mom{c.momentum}"
        f"-aff{int(c.affine)}-trs{int(c.track_running_stats)}-{str(c.memory_format)[6:]}"
        f"-g{c.group_size}"
    ),
)
def test_matches_batchnorm(run_ranks, case):
    check_against_reference(run_ranks(run_sync_bn, len(case.batch_sizes), case), case)
