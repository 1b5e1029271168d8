"""torchvision's and timm's models with syncbn's layers (docs/integrations/vision.md).

torchvision and timm cannot be imported next to the CPU build of torch used in CI: these tests run
where they import (the GPU machine), on CUDA when there is one, and skip cleanly elsewhere. In one
process without a process group SyncBatchNorm is nn.BatchNorm, so each model must compute exactly
what the same model with its own BatchNorm layers computes, from the same state_dict.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import syncbn
from tests.support.snippets import GPU_MACHINE_PAGES, run, skip_unless_importable, snippets

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _package(name: str):
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - a CUDA wheel next to CPU torch: not ImportError
        pytest.skip(f"{name} does not import here ({type(error).__name__}: {error})")


def _same_training_step(ours: nn.Module, theirs: nn.Module) -> None:
    """Load ``theirs``' weights into ``ours``; one training forward must agree, statistics too."""
    ours.load_state_dict(theirs.state_dict())
    ours.to(DEVICE).train()
    theirs.to(DEVICE).train()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)
    assert_close(ours.state_dict(), theirs.state_dict(), atol=1e-5, rtol=1e-5)


def _count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def test_torchvision_resnet50_with_norm_layer_and_converted():
    torchvision = _package("torchvision")
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50()
    ours = torchvision.models.resnet50(norm_layer=syncbn.SyncBatchNorm)
    assert _count(ours, syncbn.SyncBatchNorm) == _count(theirs, nn.BatchNorm2d) == 53
    _same_training_step(ours, theirs)
    converted = syncbn.convert_sync_batchnorm(torchvision.models.resnet50())
    assert _count(converted, syncbn.SyncBatchNorm) == 53


def test_timm_resnet_with_norm_layer():
    timm = _package("timm")
    torch.manual_seed(0)
    theirs = timm.create_model("resnet18", pretrained=False)
    ours = timm.create_model("resnet18", pretrained=False, norm_layer=syncbn.SyncBatchNorm)
    assert _count(ours, syncbn.SyncBatchNorm) == _count(theirs, nn.BatchNorm2d) > 0
    _same_training_step(ours, theirs)


def test_timm_batchnorm_act_models_convert_keeping_the_activation():
    timm = _package("timm")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    build = {"model_name": "efficientnet_b0", "pretrained": False, "drop_rate": 0.0}
    theirs = timm.create_model(**build)
    norm_act = _count(theirs, BatchNormAct2d)
    assert norm_act > 0
    ours = syncbn.convert_sync_batchnorm(timm.create_model(**build))
    assert _count(ours, syncbn.SyncBatchNormAct) == norm_act
    _same_training_step(ours, theirs)
    reverted = syncbn.revert_sync_batchnorm(ours)
    assert _count(reverted, BatchNormAct2d) == norm_act
    assert _count(reverted, syncbn.SyncBatchNorm) == 0


@pytest.mark.parametrize("page", GPU_MACHINE_PAGES)
def test_the_vision_page_snippets_run(page):
    """docs/integrations/vision.md's examples, run as written."""
    code = snippets(page)
    skip_unless_importable(code)
    run(code)
