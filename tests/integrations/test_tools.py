"""Tools that find BatchNorm layers by type, with syncbn's layers in the model.

mmengine runs for real; detectron2 cannot be installed next to CPU torch here, so its
``FrozenBatchNorm2d.convert_frozen_batchnorm`` type check is reproduced (``_detectron2_frozen``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import syncbn


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),  # converted below: remembers it was nn.BatchNorm2d
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
    )
    model = syncbn.convert_sync_batchnorm(model)
    model.append(syncbn.SyncBatchNorm(4, bias=False))  # built as ours: no original class
    for _ in range(3):  # running statistics away from their initial values
        model(torch.randn(4, 3, 5, 5) * 2 + 1)
    return model


def _detectron2_frozen(module: nn.Module) -> nn.Module:
    """detectron2's convert_frozen_batchnorm, reduced to its type check and what it keeps."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return syncbn.FrozenBatchNorm.from_batchnorm(module)
    for name, child in module.named_children():
        new = _detectron2_frozen(child)
        if new is not child:
            module.add_module(name, new)
    return module


def test_detectron2_type_check_skips_ours_and_revert_or_freeze_batchnorm_are_the_ways():
    model = _model()
    assert not any(isinstance(m, syncbn.FrozenBatchNorm) for m in _detectron2_frozen(model))

    reverted = _detectron2_frozen(syncbn.revert_sync_batchnorm(_model()))
    assert [type(m).__name__ for m in reverted if "Norm" in type(m).__name__] == [
        "FrozenBatchNorm",
        "FrozenBatchNorm",
        "BatchNormNd",  # built as ours: detectron2 does not see it, freeze_batchnorm does
    ]

    model = _model()
    x = torch.randn(2, 3, 5, 5)
    expected = model.eval()(x)
    frozen = syncbn.freeze_batchnorm(model.train())  # frozen in training mode too
    norms = [m for m in frozen if isinstance(m, syncbn.FrozenBatchNorm)]
    assert len(norms) == 3
    assert_close(frozen(x), expected)
    assert all("Norm" not in type(m).__name__ or m in norms for m in frozen)
    trainable = {name for name, _ in frozen.named_parameters()}
    assert trainable == {"0.weight", "0.bias", "3.weight", "3.bias"}  # the convolutions only
    assert set(norms[0].state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_freeze_batchnorm_refuses_a_norm_act_layer_and_untracked_statistics():
    with pytest.raises(TypeError, match="SyncBatchNormAct"):
        syncbn.freeze_batchnorm(nn.Sequential(syncbn.SyncBatchNormAct(3, act=nn.ReLU())))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        syncbn.freeze_batchnorm(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))


def test_mmengine_revert_leaves_ours_which_run_unsynchronized_in_one_process():
    mmengine_model = pytest.importorskip("mmengine.model")
    model = _model()
    reference = syncbn.revert_sync_batchnorm(_model())  # plain BatchNorm, same tensors' values
    reverted = mmengine_model.revert_sync_batchnorm(model)
    assert sum(isinstance(m, syncbn.SyncBatchNorm) for m in reverted) == 3  # not in its list
    x = torch.randn(3, 3, 5, 5)
    assert_close(reverted(x), reference(x))  # training mode, no process group: nn.BatchNorm
    assert_close(reverted.state_dict(), reference.state_dict())


def test_mmengine_registry_builds_ours_from_a_config():
    registry = pytest.importorskip("mmengine.registry")
    norms = registry.Registry("norm layer")
    norms.register_module("SyncBN", module=syncbn.SyncBatchNorm)
    layer = norms.build({"type": "SyncBN", "num_features": 8, "momentum": 0.01})
    assert isinstance(layer, syncbn.SyncBatchNorm) and layer.momentum == 0.01


def test_torch_convert_sync_batchnorm_turns_ours_into_torchs_and_ours_turns_them_back():
    """torch's converter matches every _BatchNorm, ours included, and makes nn.SyncBatchNorm
    (CUDA only in training); syncbn.convert_sync_batchnorm converts those back to ours."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model())
    assert sum(type(m) is nn.SyncBatchNorm for m in model) == 3
    model = syncbn.convert_sync_batchnorm(model)
    assert sum(type(m) is syncbn.SyncBatchNorm for m in model) == 3
    assert model[5].bias is None
