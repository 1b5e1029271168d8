"""convert_sync_batchnorm / revert_sync_batchnorm: the converter registry, norm + activation layers
(timm's BatchNormAct2d), and state_dict interchange with nn.BatchNorm.

timm cannot be imported here, so its two BatchNorm subclasses are stood in for by classes with the
same constructor, submodules and forward, placed under timm's module path (that, the class name
and the structure are all the converter looks at).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

import syncbn
from syncbn import (
    BatchNormAct,
    BatchNormNd,
    SyncBatchNorm,
    SyncBatchNormAct,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from syncbn import convert as convert_module


class BatchNormAct2d(nn.BatchNorm2d):
    """Stand-in for ``timm.layers.norm_act.BatchNormAct2d``: BatchNorm2d, then drop, then act."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        apply_act=True,
        act_layer=nn.ReLU,
        act_kwargs=None,
        inplace=True,
        drop_layer=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.drop = nn.Identity() if drop_layer is None else drop_layer()
        kwargs = dict(act_kwargs or {})
        if act_layer is None or not apply_act:
            self.act = nn.Identity()
        else:
            if inplace:
                kwargs["inplace"] = True
            self.act = act_layer(**kwargs)

    def forward(self, x):
        # nn.BatchNorm2d's forward written out, as timm does (for TorchScript), then drop and act.
        if x.ndim != 4:
            raise ValueError(f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


class TimmSyncBatchNormAct(nn.SyncBatchNorm):
    """Stand-in for ``timm.layers.norm_act.SyncBatchNormAct`` (timm's converter sets drop, act)."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


BatchNormAct2d.__module__ = TimmSyncBatchNormAct.__module__ = "timm.layers.norm_act"
TimmSyncBatchNormAct.__name__ = TimmSyncBatchNormAct.__qualname__ = "SyncBatchNormAct"


class ScaledBN(nn.BatchNorm2d):
    """A subclass with a forward of its own that no converter knows."""

    def forward(self, x):
        return 2 * super().forward(x)


class SyncScaledBN(SyncBatchNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class CheckedBN(nn.BatchNorm2d):
    """Overrides only the input check: computes what BatchNorm2d computes."""

    def _check_input_dim(self, input):
        if input.dim() != 4 or input.shape[-1] != input.shape[-2]:
            raise ValueError("CheckedBN expected square 4D input")


@pytest.fixture
def registries():
    """Registrations made by a test are undone after it."""
    saved = dict(convert_module._CONVERTERS), dict(convert_module._REVERTERS)
    yield
    for registry, entries in zip(
        (convert_module._CONVERTERS, convert_module._REVERTERS), saved, strict=True
    ):
        registry.clear()
        registry.update(entries)


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


def test_revert_bn_class_applies_to_converted_layers_and_spares_norm_act_layers():
    """``bn_class`` wins over the class a plain layer was converted from; a norm + act layer
    keeps its own class and act. The reverted layers still share the original tensors."""
    original = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(3), BatchNormAct2d(3)).eval()
    tensors = [(m.weight, m.running_mean, m.num_batches_tracked) for m in original]
    act = original[2].act
    x = torch.randn(2, 3, 4, 4)
    expected = original[1:](x)
    model = revert_sync_batchnorm(convert_sync_batchnorm(original), bn_class=BatchNormNd)
    assert [type(m) for m in model] == [BatchNormNd, BatchNormNd, BatchNormAct2d]
    assert model[2].act is act
    assert [(m.weight, m.running_mean, m.num_batches_tracked) for m in model] == tensors
    assert_close(model[1:](x), expected, rtol=0, atol=0)


def _batch(step: int) -> torch.Tensor:
    return torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(step)) * 2 + step


def _cumulative(layer: _BatchNorm, steps: range) -> _BatchNorm:
    for step in steps:
        layer(_batch(step))
    return layer


def _running(layer) -> tuple[torch.Tensor, ...]:
    return layer.running_mean, layer.running_var, layer.num_batches_tracked


def test_convert_and_revert_keep_num_batches_tracked_for_the_cumulative_average():
    """momentum=None: batch k enters the running average with weight 1 / k. A count lost in
    either conversion would make the next batch overwrite the running statistics."""
    reference = _cumulative(nn.BatchNorm2d(3, momentum=None), range(3))
    trained = copy.deepcopy(reference)
    count = trained.num_batches_tracked
    sync = convert_sync_batchnorm(trained)
    assert sync.num_batches_tracked is count and int(count) == 3
    _cumulative(sync, range(3, 4))
    _cumulative(reference, range(3, 4))
    assert_close(_running(sync), _running(reference), rtol=0, atol=0)

    back = revert_sync_batchnorm(sync)
    assert back.num_batches_tracked is count and int(count) == 4
    _cumulative(back, range(4, 5))
    _cumulative(reference, range(4, 5))
    assert_close(_running(back), _running(reference), rtol=0, atol=0)


def test_converted_model_computes_what_the_original_does():
    torch.manual_seed(0)
    original = small_model()
    copy = convert_sync_batchnorm(small_model())
    copy.load_state_dict(original.state_dict())
    x = torch.randn(4, 3, 6, 6)
    assert_close(copy(x), original(x), rtol=0, atol=0)
    assert_close(copy.state_dict(), original.state_dict(), rtol=0, atol=0)


def _trained_layer_synchronized_next() -> dict:
    """A layer trained for 3 batches, converted; the 4th batch split between 2 ranks."""
    rank = dist.get_rank()
    reference = _cumulative(nn.BatchNorm2d(3, momentum=None), range(3))
    sync = convert_sync_batchnorm(copy.deepcopy(reference))
    sync(_batch(3)[3 * rank : 3 * rank + 3])
    reference(_batch(3))
    return {"got": _running(sync), "expected": _running(reference)}


def test_converted_trained_layer_continues_its_cumulative_average_on_gloo_ranks(run_ranks):
    for r in run_ranks(_trained_layer_synchronized_next, 2):
        assert int(r["got"][2]) == 4
        assert_close(r["got"], r["expected"], rtol=1e-5, atol=1e-6)


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


# ---------------------------------------------------------------------------- norm + activation


def timm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        BatchNormAct2d(4),  # ReLU(inplace=True)
        nn.Conv2d(4, 4, 1),
        BatchNormAct2d(4, act_layer=nn.PReLU, inplace=False, drop_layer=lambda: nn.Dropout(0.3)),
    )
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.weight.uniform_(0.5, 2)
            layer.bias.uniform_(-1, 1)
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    return model


def test_timm_batchnorm_act_converts_to_sync_batchnorm_act_keeping_drop_and_act():
    original = timm_model()
    model = copy.deepcopy(original)
    drop, act, weight = model[3].drop, model[3].act, model[3].weight
    converted = convert_sync_batchnorm(model)
    assert type(converted[1]) is SyncBatchNormAct and type(converted[3]) is SyncBatchNormAct
    assert converted[3].drop is drop and converted[3].act is act and converted[3].weight is weight
    assert converted[1].layer_name == "1"
    assert converted.state_dict().keys() == original.state_dict().keys()  # act.weight too

    x = torch.randn(6, 3, 7, 7) * 3 + 1
    for train in (False, True):  # eval: running stats; train (1 process): batch stats, dropout
        original.train(train), converted.train(train)
        torch.manual_seed(1)
        expected = original[:2](x)
        expected_out = original(x)
        torch.manual_seed(1)
        got = converted[:2](x)
        got_out = converted(x)
        assert (expected >= 0).all() and expected.min() == 0  # the ReLU does something here
        assert_close(got, expected, rtol=0, atol=0)
        assert_close(got_out, expected_out, rtol=0, atol=0)
    assert_close(converted.state_dict(), original.state_dict(), rtol=0, atol=0)


def _timm_layer_rank(batch_sizes, momentum):
    """Each rank: its slice through the converted layer; the original on the concatenated batch."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64) for n in batch_sizes]
    torch.manual_seed(0)
    original = BatchNormAct2d(3, momentum=momentum).double()  # ReLU(inplace=True)
    with torch.no_grad():
        original.weight.uniform_(0.5, 2)
        original.bias.uniform_(-1, 1)
    layer = convert_sync_batchnorm(copy.deepcopy(original))
    everything = torch.cat(batches).requires_grad_()
    expected = original(everything)
    (expected * torch.arange(expected.numel()).view_as(expected)).sum().backward()
    start = sum(batch_sizes[:rank])
    mine = everything.detach()[start : start + batch_sizes[rank]].clone().requires_grad_()
    out = layer(mine)
    (
        out * torch.arange(expected.numel()).view_as(expected)[start : start + len(mine)]
    ).sum().backward()
    return {
        "type": type(layer).__name__,
        "out": out.detach(),
        "expected": expected.detach()[start : start + len(mine)],
        "grad": mine.grad,
        "expected_grad": everything.grad[start : start + len(mine)],
        "running": (layer.running_mean, layer.running_var),
        "expected_running": (original.running_mean, original.running_var),
    }


@pytest.mark.parametrize(
    "batch_sizes, momentum", [((3, 5), 0.1), ((2, 0, 4), None)], ids=["2-ranks", "3-ranks-empty"]
)
def test_timm_batchnorm_act_on_gloo_ranks_equals_the_original_on_the_concatenated_batch(
    run_ranks, batch_sizes, momentum
):
    for r in run_ranks(_timm_layer_rank, len(batch_sizes), batch_sizes, momentum):
        assert r["type"] == "SyncBatchNormAct"
        assert (r["out"] >= 0).all()
        assert_close(r["out"], r["expected"], rtol=1e-9, atol=1e-9)
        assert_close(r["grad"], r["expected_grad"], rtol=1e-9, atol=1e-9)
        assert_close(r["running"], r["expected_running"], rtol=1e-9, atol=1e-9)


def test_timm_round_trip_and_checkpoint_interchange():
    original = timm_model()
    act = original[3].act
    model = revert_sync_batchnorm(convert_sync_batchnorm(copy.deepcopy(original)))
    assert [type(m) for m in model] == [type(m) for m in original]
    assert type(model[3].act) is nn.PReLU and type(model[3].drop) is nn.Dropout
    x = torch.randn(2, 3, 6, 6)
    assert_close(model.eval()(x), original.eval()(x), rtol=0, atol=0)

    converted = convert_sync_batchnorm(copy.deepcopy(original))
    converted[3].act.weight.data.fill_(0.7)
    fresh = timm_model()
    fresh.load_state_dict(converted.state_dict())  # strict, both ways
    converted.load_state_dict(original.state_dict())
    assert_close(converted.eval()(x), original(x), rtol=0, atol=0)
    assert fresh[3].act.weight.item() == pytest.approx(0.7) and act.weight.item() != 0.7


def test_timm_sync_batchnorm_act_converts_and_reverts_keeping_act():
    layer = TimmSyncBatchNormAct(3)
    layer.act = nn.ReLU()
    layer.eval()
    x = torch.randn(4, 3, 5)
    expected = layer(x)
    assert (expected == 0).any()
    assert type(convert_sync_batchnorm(copy.deepcopy(layer))) is SyncBatchNormAct
    for result in (
        revert_sync_batchnorm(convert_sync_batchnorm(copy.deepcopy(layer))),
        revert_sync_batchnorm(copy.deepcopy(layer)),  # a torch SyncBatchNorm, reverted directly
    ):
        assert type(result) is BatchNormAct and type(result.act) is nn.ReLU
        assert_close(result(x), expected, rtol=0, atol=0)
    bare = TimmSyncBatchNormAct(3).eval()  # no drop, no act: timm applies neither
    assert_close(revert_sync_batchnorm(bare)(x), bare(x), rtol=0, atol=0)


def test_sync_batchnorm_act_direct_use_and_plain_fallback():
    layer = SyncBatchNormAct(3, act=nn.ReLU(), drop=nn.Dropout(0.0))
    x = torch.randn(5, 3)
    assert (layer(x) >= 0).all()
    back = revert_sync_batchnorm(layer)
    assert type(back) is BatchNormAct and back.act is layer.act
    assert type(convert_sync_batchnorm(back)) is SyncBatchNormAct  # and round again
    with pytest.raises(TypeError, match=r"SyncBatchNormAct expected act to be an nn.Module"):
        SyncBatchNormAct(3, act=torch.relu)


@pytest.mark.parametrize("cls", [SyncBatchNormAct, BatchNormAct])
def test_norm_act_keeps_its_drop_module_and_drops_before_the_activation(cls):
    """SiLU(2 z) != 2 SiLU(z): with dropout active, act(drop(BN(x))) and drop(act(BN(x)))
    differ, so the order shows (ReLU, PReLU with positive weights would commute with it)."""
    drop, act = nn.Dropout(0.5), nn.SiLU()
    layer = cls(3, drop=drop, act=act)
    assert layer.drop is drop and layer.act is act
    x = torch.randn(16, 3, 2) * 3 + 1
    normalized = nn.BatchNorm1d(3)(x)
    torch.manual_seed(1)
    expected = act(drop(normalized))
    torch.manual_seed(1)
    assert not torch.allclose(drop(act(normalized)), expected)  # the order is observable
    torch.manual_seed(1)
    assert_close(layer(x), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------- unknown layers


def test_unknown_subclass_is_refused_naming_path_and_class_before_anything_changes():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.BatchNorm2d(3), ScaledBN(3)))
    with pytest.raises(TypeError) as error:
        convert_sync_batchnorm(model)
    message = str(error.value)
    assert "'1.1' (tests.layer.test_convert.ScaledBN)" in message
    assert "syncbn.register_converter(cls, fn)" in message and "strict=False" in message
    assert type(model[1][0]) is nn.BatchNorm2d  # nothing was converted

    x = torch.randn(4, 3, 5, 5)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"'1.1' \(tests.layer.test_convert.ScaledBN\)"):
        converted = convert_sync_batchnorm(model, strict=False)
    assert type(converted[1][0]) is SyncBatchNorm and type(converted[1][1]) is ScaledBN
    assert_close(converted(x), expected, rtol=0, atol=0)


def test_root_layer_and_a_class_named_like_timm_elsewhere_are_refused():
    layer = ScaledBN(3)
    with pytest.raises(TypeError, match=r"got '\(root\)' \(tests.layer.test_convert.ScaledBN\)"):
        convert_sync_batchnorm(layer)
    lookalike = type("BatchNormAct2d", (ScaledBN,), {"forward": lambda self, x: x})
    with pytest.raises(TypeError, match=r"tests.layer.test_convert.BatchNormAct2d"):
        convert_sync_batchnorm(lookalike(3))  # not timm's: the module path must match too


def test_subclass_overriding_only_the_input_check_converts_and_reverts():
    sync = convert_sync_batchnorm(nn.Sequential(CheckedBN(3)))
    assert type(sync[0]) is SyncBatchNorm
    assert type(revert_sync_batchnorm(sync)[0]) is CheckedBN


def test_revert_refuses_an_unknown_synchronized_subclass():
    model = nn.Sequential(SyncBatchNorm(3), SyncScaledBN(3))
    with pytest.raises(
        TypeError, match=r"'1' \(tests.layer.test_convert.SyncScaledBN\).*register_reverter"
    ):
        revert_sync_batchnorm(model)
    assert type(model[0]) is SyncBatchNorm
    with pytest.warns(UserWarning, match="SyncScaledBN"):
        model = revert_sync_batchnorm(model, strict=False)
    assert [type(m) for m in model] == [BatchNormNd, SyncScaledBN]


# ---------------------------------------------------------------------------- the registry


def test_registered_converter_and_reverter_for_a_user_class(registries):
    @syncbn.register_converter(ScaledBN)
    def to_sync(module, process_group):
        return convert_module._swap(module, SyncScaledBN, process_group=process_group)

    syncbn.register_reverter(SyncScaledBN, lambda module: convert_module._swap(module, ScaledBN))
    inherits = type("InheritsForward", (ScaledBN,), {})
    overrides = type("OverridesForward", (ScaledBN,), {"forward": lambda self, x: x})
    torch.manual_seed(0)
    original = nn.Sequential(ScaledBN(3), inherits(3), nn.BatchNorm2d(3)).eval()
    original[0].running_mean.uniform_()
    model = convert_sync_batchnorm(copy.deepcopy(original))
    assert [type(m) for m in model] == [SyncScaledBN, SyncScaledBN, SyncBatchNorm]
    x = torch.randn(2, 3, 4, 4)
    assert_close(model.eval()(x), original(x), rtol=0, atol=0)
    back = revert_sync_batchnorm(model)
    assert [type(m) for m in back] == [ScaledBN, ScaledBN, nn.BatchNorm2d]
    assert_close(back(x), original(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="OverridesForward"):
        convert_sync_batchnorm(overrides(3))


def test_register_by_dotted_name_and_norm_act_building_block(registries):
    class MyBNAct(nn.BatchNorm1d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(super().forward(x))

    syncbn.register_converter(
        f"{MyBNAct.__module__}.{MyBNAct.__qualname__}", syncbn.convert.to_sync_batchnorm_act
    )
    layer = MyBNAct(3).eval()
    x = torch.randn(4, 3) * 5
    converted = convert_sync_batchnorm(copy.deepcopy(layer))
    assert type(converted) is SyncBatchNormAct and type(converted.act) is nn.Tanh
    back = revert_sync_batchnorm(converted)
    assert type(back) is MyBNAct
    for result in (converted, back):
        assert_close(result(x), layer(x), rtol=0, atol=0)


def test_register_rejects_bad_arguments(registries):
    with pytest.raises(TypeError, match=r"register_converter expected a subclass of _BatchNorm"):
        syncbn.register_converter(nn.Linear, lambda m, pg: m)
    with pytest.raises(ValueError, match=r'expected a class or its "module.QualName"'):
        syncbn.register_converter("ScaledBN", lambda m, pg: m)
    with pytest.raises(TypeError, match=r"register_reverter expected a callable \(got int\)"):
        syncbn.register_reverter(SyncScaledBN, 3)
    syncbn.register_converter(ScaledBN, lambda m, pg: None)
    with pytest.raises(TypeError, match=r"to return an nn.Module \(got NoneType\)"):
        convert_sync_batchnorm(ScaledBN(3))


# ---------------------------------------------------------------------------- what carries over


def test_module_hooks_carry_over_and_their_handles_still_work():
    bn = nn.BatchNorm2d(3).eval()
    handle = bn.register_forward_hook(lambda module, args, output: output * 10)
    x = torch.randn(2, 3, 4, 4)
    expected = bn(x)
    sync = convert_sync_batchnorm(bn)
    assert_close(sync(x), expected, rtol=0, atol=0)
    back = revert_sync_batchnorm(sync)
    assert_close(back(x), expected, rtol=0, atol=0)
    handle.remove()
    assert_close(back(x) * 10, expected, rtol=0, atol=0)


def test_a_layer_used_twice_is_converted_once():
    bn = nn.BatchNorm1d(3)
    model = convert_sync_batchnorm(nn.Sequential(bn, nn.Linear(3, 3), bn))
    assert type(model[0]) is SyncBatchNorm and model[0] is model[2]


def test_parametrized_layer_is_refused():
    model = nn.Sequential(nn.BatchNorm1d(3))
    nn.utils.parametrize.register_parametrization(model[0], "weight", nn.Identity())
    with pytest.raises(ValueError, match=r"parametrized ones in '0'"):
        convert_sync_batchnorm(model)


def _converted_into_groups_of_two() -> dict:
    """4 ranks, groups of 2: convert with the group, train one step, report what each layer
    holds. Rank r's data have mean r, so the pairs' statistics differ."""
    import torch.distributed as dist

    import syncbn

    rank = dist.get_rank()
    group = syncbn.new_sync_group(2)
    model = convert_sync_batchnorm(
        nn.Sequential(nn.BatchNorm1d(3, momentum=1.0), nn.Sequential(nn.BatchNorm2d(3))),
        process_group=group,
    )
    gen = torch.Generator().manual_seed(rank)
    model[0](torch.randn(8, 3, generator=gen, dtype=torch.float32) + rank)
    layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    inputs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(r)) + r for r in range(4)]
    return {
        "groups_kept": [layer.process_group is group for layer in layers],
        "running_mean": model[0].running_mean.clone(),
        "inputs": inputs,
    }


def test_convert_keeps_the_process_group(run_ranks):
    """Every converted layer syncs over the group it was given (ranks {0,1} and {2,3}), not the
    world: each pair's running mean is its own pair's batch mean."""
    results = run_ranks(_converted_into_groups_of_two, 4)
    inputs = results[0]["inputs"]
    for rank, result in enumerate(results):
        assert result["groups_kept"] == [True, True]
        pair = 0 if rank < 2 else 2
        expected = torch.cat(inputs[pair : pair + 2]).mean(0)
        assert_close(result["running_mean"], expected)
