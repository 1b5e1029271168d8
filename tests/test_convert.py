"""convert_sync_batchnorm / revert_sync_batchnorm and state_dict interchange with nn.BatchNorm."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from syncbn import BatchNormNd, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
        nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(4, eps=1e-3, affine=False)),
    )


def test_convert_replaces_every_batchnorm_and_shares_tensors():
    model = small_model()
    model[1].qconfig = "sentinel-qconfig"
    model[2][1].eval()
    weight, running_mean = model[1].weight, model[1].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    converted = convert_sync_batchnorm(model)

    assert converted is model
    bn2, bn1 = model[1], model[2][1]
    assert type(bn2) is SyncBatchNorm and type(bn1) is SyncBatchNorm
    assert bn2.weight is weight and bn2.running_mean is running_mean  # same tensors
    assert bn2.momentum is None and bn1.eps == 1e-3 and bn1.weight is None
    assert bn2.qconfig == "sentinel-qconfig"
    assert bn2.training and not bn1.training
    assert optimizer.param_groups[0]["params"][2] is bn2.weight  # optimizer still holds them


def test_convert_root_layer_and_revert_round_trip():
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        bn = cls(3)
        sync = convert_sync_batchnorm(bn)
        assert type(sync) is SyncBatchNorm
        back = revert_sync_batchnorm(sync)
        assert type(back) is cls and back.weight is bn.weight


def test_revert_of_unknown_origin_and_torch_syncbn():
    back = revert_sync_batchnorm(nn.Sequential(SyncBatchNorm(3), nn.SyncBatchNorm(3)))
    assert [type(m) for m in back] == [BatchNormNd, BatchNormNd]
    for x in (torch.randn(4, 3), torch.randn(4, 3, 5), torch.randn(2, 3, 4, 4)):
        assert back(x).shape == x.shape
    assert type(revert_sync_batchnorm(SyncBatchNorm(3), bn_class=nn.BatchNorm2d)) is nn.BatchNorm2d


def test_converted_model_computes_what_the_original_does():
    torch.manual_seed(0)
    original = small_model()
    copy = convert_sync_batchnorm(small_model())
    copy.load_state_dict(original.state_dict())
    x = torch.randn(4, 3, 6, 6)
    assert_close(copy(x), original(x), rtol=0, atol=0)
    assert_close(copy.state_dict(), original.state_dict(), rtol=0, atol=0)


def test_convert_rejects_uninitialized_lazy_layers():
    with pytest.raises(ValueError, match="run one forward pass before converting"):
        convert_sync_batchnorm(nn.LazyBatchNorm2d())


@pytest.mark.parametrize("source", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_state_dict_interchange(source):
    torch.manual_seed(0)
    theirs = source(5)
    theirs.train()
    if source is nn.BatchNorm2d:
        theirs(torch.randn(8, 5, 3, 3))  # non-trivial running stats
    ours = SyncBatchNorm(5)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())  # strict: same keys both ways
    assert_close(back.state_dict(), theirs.state_dict(), rtol=0, atol=0)


def test_old_checkpoint_without_num_batches_tracked_loads():
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # as saved before PyTorch 0.4.1 added the buffer
    bn = SyncBatchNorm(3)
    bn.load_state_dict(state)  # _BatchNorm's version-1 migration applies
    assert int(bn.num_batches_tracked) == 0
