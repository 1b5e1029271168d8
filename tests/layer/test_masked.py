"""Masked SyncBatchNorm on W gloo ranks equals nn.BatchNorm1d on the real elements only.

Each rank holds a padded batch (variable-length sequences, or images with a pixel mask); the
reference gathers the real elements of all ranks' batches as rows ``(M, C)`` and runs
``nn.BatchNorm1d`` on them. Outputs and input gradients at real positions, weight/bias gradients
(summed over ranks) and running statistics must match; padded positions must output zero and get
zero gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn

C = 3
STEPS = 2
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _batches(batch_sizes, spatial, step):
    """Every rank's padded batch, upstream gradient and mask for one step (the same everywhere)."""
    gen = torch.Generator().manual_seed(50 + step)
    out = []
    for n in batch_sizes:
        x = torch.randn(n, C, *spatial, generator=gen, dtype=torch.float64) * 3 + 1
        dy = torch.randn(n, C, *spatial, generator=gen, dtype=torch.float64)
        if len(spatial) == 1:  # sequences: a length per sample, zero allowed
            lengths = torch.randint(0, spatial[0] + 1, (n,), generator=gen)
            mask = lengths[:, None] > torch.arange(spatial[0])
        else:  # any pattern of real pixels
            mask = torch.rand(n, *spatial, generator=gen) < 0.6
        x = x.masked_fill(~mask.unsqueeze(1), 1e6)  # padding garbage must not leak anywhere
        out.append((x, dy, mask))
    return out


def _masked_rank(batch_sizes, spatial, momentum):
    rank = dist.get_rank()
    layer = syncbn.SyncBatchNorm(C, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    steps = []
    for step in range(STEPS):
        x, dy, mask = _batches(batch_sizes, spatial, step)[rank]
        x = x.requires_grad_()
        y = layer(x, mask)
        y.backward(dy)
        steps.append({"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad.clone(),
                      "db": layer.bias.grad.clone(), "mask": mask,
                      "state": {k: v.clone() for k, v in layer.state_dict().items()}})  # fmt: skip
        layer.zero_grad()
    layer.eval()
    x, _, mask = _batches(batch_sizes, spatial, 99)[rank]
    return {"steps": steps, "eval": layer(x, mask), "eval_rows": _rows(x, mask), "eval_mask": mask}


def _rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1)[mask]


def _reference(batch_sizes, spatial, momentum):
    layer = nn.BatchNorm1d(C, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    steps = []
    for step in range(STEPS):
        ranks = _batches(batch_sizes, spatial, step)
        rows = torch.cat([_rows(x, m) for x, _, m in ranks]).requires_grad_()
        y = layer(rows)
        y.backward(torch.cat([_rows(dy, m) for _, dy, m in ranks]))
        steps.append({"y": y.detach(), "dx": rows.grad, "dw": layer.weight.grad.clone(),
                      "db": layer.bias.grad.clone(),
                      "state": {k: v.clone() for k, v in layer.state_dict().items()}})  # fmt: skip
        layer.zero_grad()
    layer.eval()
    return {"steps": steps, "eval": layer}


@pytest.mark.parametrize(
    "batch_sizes, spatial, momentum",
    [
        ((4,), (6,), 0.1),
        ((3, 2), (6,), 0.1),
        ((4, 1, 3), (5,), None),  # cumulative running average
        ((2, 0, 3), (4,), 0.1),  # a rank with no samples at all
        ((3, 2), (3, 4), 0.1),  # images with a pixel mask
    ],
)
def test_masked_syncbn_equals_batchnorm_on_real_elements(run_ranks, batch_sizes, spatial, momentum):
    results = run_ranks(_masked_rank, len(batch_sizes), batch_sizes, spatial, momentum)
    ref = _reference(batch_sizes, spatial, momentum)
    for step, ref_step in enumerate(ref["steps"]):
        ranks = [r["steps"][step] for r in results]
        real_y = torch.cat([_rows(r["y"], r["mask"]) for r in ranks])
        real_dx = torch.cat([_rows(r["dx"], r["mask"]) for r in ranks])
        assert_close(real_y, ref_step["y"], **TOL, msg=f"outputs, step {step}")
        assert_close(real_dx, ref_step["dx"], **TOL, msg=f"input gradients, step {step}")
        for r in ranks:  # padding: zero output, zero gradient
            padded = ~r["mask"]
            assert torch.count_nonzero(r["y"].movedim(1, -1)[padded]) == 0
            assert torch.count_nonzero(r["dx"].movedim(1, -1)[padded]) == 0
        for key in ("dw", "db"):
            assert_close(torch.stack([r[key] for r in ranks]).sum(0), ref_step[key], **TOL)
        for r in ranks:
            for key, value in ref_step["state"].items():
                assert_close(r["state"][key], value, **TOL, msg=f"{key}, step {step}")
    for r in results:  # eval: running statistics on the real elements, zeros elsewhere
        assert_close(_rows(r["eval"], r["eval_mask"]), ref["eval"](r["eval_rows"]), **TOL)
        assert torch.count_nonzero(r["eval"].movedim(1, -1)[~r["eval_mask"]]) == 0


def test_mask_broadcasts_and_may_carry_a_channel_axis():
    """Each spelling of the same mask gives nn.BatchNorm1d on the real rows, and zeros elsewhere."""
    torch.manual_seed(0)
    x = torch.randn(4, C, 5, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True])
    full = keep[:, None].expand(4, 5)
    reference = torch.nn.BatchNorm1d(C, dtype=torch.float64)
    expected_rows = reference(x.movedim(1, -1)[full])  # (M, C)
    for mask in (full, keep[:, None], full[:, None]):  # (N, L), (N, 1), (N, 1, L)
        layer = syncbn.SyncBatchNorm(C).double()
        y = layer(x, mask)
        assert_close(y.movedim(1, -1)[full], expected_rows)
        assert torch.count_nonzero(y.movedim(1, -1)[~full]) == 0
        assert_close(layer.running_mean, reference.running_mean)
        assert_close(layer.running_var, reference.running_var)


@pytest.mark.parametrize(
    "mask, error, pattern",
    [
        (
            torch.ones(4, 5),
            TypeError,
            r"torch.bool tensor.*got torch.float32",
        ),
        ([True] * 4, TypeError, r"torch.bool tensor.*got list"),
        (torch.ones(4, 6, dtype=torch.bool), ValueError, r"mask of shape \(N, \*\) = \(4, 5\)"),
        (torch.ones(4, dtype=torch.bool), ValueError, r"got mask of shape \(4,\)"),
    ],
)
def test_bad_masks_are_rejected(mask, error, pattern):
    with pytest.raises(error, match=pattern):
        syncbn.SyncBatchNorm(C)(torch.randn(4, C, 5), mask)
