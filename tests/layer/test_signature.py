"""Constructor parity with the installed torch's ``nn.SyncBatchNorm``: every argument, default and
position, so that a torch release that adds one fails this test rather than a user's code."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn

# Ours only, all keyword-only: what torch's class has no counterpart for.
OUR_EXTRAS = {"debug", "check_finite"}
NORM_ACT_EXTRAS = OUR_EXTRAS | {"drop", "act"}


def _parameters(cls) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls).parameters)


@pytest.mark.parametrize(
    "ours, extras",
    [(syncbn.SyncBatchNorm, OUR_EXTRAS), (syncbn.SyncBatchNormAct, NORM_ACT_EXTRAS)],
    ids=["SyncBatchNorm", "SyncBatchNormAct"],
)
def test_every_argument_of_torch_sync_batchnorm_with_its_default_and_kind(ours, extras):
    theirs, mine = _parameters(nn.SyncBatchNorm), _parameters(ours)
    missing = sorted(set(theirs) - set(mine))
    assert not missing, f"{ours.__name__} lacks torch's arguments {missing}"
    for name, parameter in theirs.items():
        assert mine[name].default == parameter.default, name
        assert mine[name].kind == parameter.kind, name
    positional = [n for n, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert list(mine)[: len(positional)] == positional  # same positions: (64, 1e-3, 0.01, ...)
    extra = set(mine) - set(theirs)
    assert extra == extras
    assert all(mine[name].kind is inspect.Parameter.KEYWORD_ONLY for name in extra)


def test_bias_false_has_a_weight_and_no_bias_like_torch():
    theirs = nn.SyncBatchNorm(4, bias=False)
    mine = syncbn.SyncBatchNorm(4, bias=False)
    assert mine.bias is None and mine.weight is not None
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    assert [n for n, _ in mine.named_parameters()] == ["weight"]
    mine.load_state_dict(theirs.state_dict())
    assert "bias=False" in repr(mine)
    assert syncbn.SyncBatchNormAct(4, bias=False).bias is None
    assert syncbn.BatchNormAct(4, bias=False).bias is None


def test_convert_and_revert_keep_a_missing_bias():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, bias=False))
    converted = syncbn.convert_sync_batchnorm(model)
    assert isinstance(converted[1], syncbn.SyncBatchNorm) and converted[1].bias is None
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert type(reverted[1]) is nn.BatchNorm2d and reverted[1].bias is None


def _train_without_bias(x_all: torch.Tensor, dy_all: torch.Tensor) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    x = x_all.chunk(world)[rank].clone().requires_grad_()
    bn = syncbn.SyncBatchNorm(3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    y = bn(x)
    y.backward(dy_all.chunk(world)[rank])
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "state": bn.state_dict()}


def test_bias_false_matches_batchnorm_on_the_global_batch(run_ranks):
    x_all = torch.randn(6, 3, 4, dtype=torch.float64) * 3 + 1
    dy_all = torch.randn_like(x_all)
    results = run_ranks(_train_without_bias, 2, x_all, dy_all)

    reference = nn.BatchNorm1d(3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    x = x_all.clone().requires_grad_()
    y = reference(x)
    y.backward(dy_all)
    assert_close(torch.cat([r["y"] for r in results]), y.detach())
    assert_close(torch.cat([r["dx"] for r in results]), x.grad)
    assert_close(sum(r["dw"] for r in results), reference.weight.grad)
    for r in results:
        assert_close(r["state"], reference.state_dict())
