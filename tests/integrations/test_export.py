"""A model trained with SyncBatchNorm on 2 gloo ranks exports in eval mode, as it is (no revert),
with ``torch.export`` and to ONNX, and the exported programs compute what the model computes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        syncbn.SyncBatchNorm(3),  # first: no convolution to fold it into
        nn.Conv2d(3, 4, 3, padding=1),
        syncbn.SyncBatchNormAct(4, act=nn.ReLU()),
        nn.Conv2d(4, 2, 1),
        syncbn.SyncBatchNorm(2, bias=False),
    )


def _train_then_export() -> dict:
    from onnx.reference import ReferenceEvaluator

    rank = dist.get_rank()
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)  # CPU, gloo: our layers are accepted
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        generator = torch.Generator().manual_seed(10 * step + rank)
        x = torch.randn(2 + rank, 3, 5, 5, generator=generator) * (1 + rank) + rank
        ddp(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,)).module()(x)
    record = {"expected": expected, "exported": exported}
    if rank == 0:  # the ONNX exporter takes seconds: one rank is enough
        proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        onnx.checker.check_model(proto)
        session = ReferenceEvaluator(proto)
        (output,) = session.run(None, {proto.graph.input[0].name: x.numpy()})
        record["onnx"] = torch.from_numpy(output)
    return record


def test_trained_model_exports_without_revert(run_ranks):
    results = run_ranks(_train_then_export, 2, timeout=120)
    assert_close(results[0]["expected"], results[1]["expected"])  # the same model on each rank
    for result in results:
        assert_close(result["exported"], result["expected"])
    assert_close(results[0]["onnx"], results[0]["expected"], atol=1e-5, rtol=1e-5)
