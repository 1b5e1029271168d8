"""Models by import path (``model._target_``), and the DeepLab-style model whose image-pooling
branch is where per-rank BatchNorm breaks and SyncBN does not."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

import syncbn
from syncbn.training.errors import ConfigError
from syncbn.training.models import DeepLab, ResNet, build_model
from tests.support.config import compose_config


def _model_cfg(target: str, **arguments):
    return OmegaConf.create({"_target_": target, **arguments})


def test_a_class_by_import_path_is_told_the_data_s_channels_and_classes():
    model = build_model(_model_cfg("tests.support.toy_models.TinyNet", width=6), "bn", 3, 7)
    assert model.built_with == {"in_channels": 3, "num_classes": 7, "width": 6}
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 7)


def test_a_factory_with_kwargs_gets_num_classes_only_and_timm_names_get_theirs():
    """torchvision's resnet50(**kwargs) would reject in_channels: a **kwargs gets num_classes."""
    model = build_model(_model_cfg("tests.support.toy_models.tiny_factory", depth=2), "bn", 3, 5)
    assert model.built_with == {"in_channels": 1, "num_classes": 5, "width": 8, "depth": 2}
    model = build_model(_model_cfg("tests.support.toy_models.TimmStyle"), "bn", 1, 4)
    assert model.built_with["in_channels"] == 1 and model.built_with["num_classes"] == 4
    given = build_model(_model_cfg("tests.support.toy_models.TimmStyle", in_chans=3), "bn", 1, 4)
    assert given.built_with["in_channels"] == 3  # the config's explicit value wins


def test_the_default_config_builds_the_built_in_resnet_through_its_target():
    cfg = compose_config()
    assert cfg.model._target_ == "syncbn.training.models.ResNet"
    model = build_model(cfg.model, "syncbn", 1, 10)
    assert isinstance(model, ResNet)
    assert sum(isinstance(m, syncbn.SyncBatchNorm) for m in model.modules()) == 6


def test_norm_syncbn_converts_the_batchnorms_of_a_model_it_did_not_build():
    model = build_model(_model_cfg("tests.support.toy_models.TinyNet"), "syncbn", 1, 3)
    assert isinstance(model.body[1], syncbn.SyncBatchNorm)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


@pytest.mark.parametrize(
    ("target", "arguments", "norm", "message"),
    [
        ("torchvision.models.resnet50", {}, "bn",
         r"No module named 'torchvision'\) \(install the optional extra: pip install "),
        ("tests.support.toy_models.Missing", {}, "bn", r"has no attribute 'Missing'"),
        ("tests.support.toy_models.TinyNet", {"depth": 3}, "bn",
         r"could not be built with the arguments \['depth', 'in_channels', 'num_classes'\] "
         r"\(TypeError: .*unexpected keyword argument 'depth'\)"),
        ("tests.support.toy_models.TinyNet", {"num_classes": 3}, "bn",
         r"model.num_classes expected the data's 10 classes \(got 3\)"),
        ("tests.support.toy_models.TinyNet", {}, "none",
         r"norm=none expected a model that takes a `norm` argument"),
        ("tests.support.toy_models.not_a_module", {}, "bn",
         r"expected to return a torch.nn.Module"),
    ],
)  # fmt: skip
def test_a_bad_target_is_a_config_error_naming_key_and_fix(target, arguments, norm, message):
    with pytest.raises(ConfigError, match=message):
        build_model(_model_cfg(target, **arguments), norm, 1, 10)


def test_model_custom_without_a_target_is_rejected_before_work():
    from syncbn.training.config import validate

    with pytest.raises(ConfigError, match=r"model._target_ expected the import path"):
        validate(compose_config("model=custom"), world_size=1, cuda=False)


# ----------------------------------------------------------------------------- DeepLab


def _deeplab(norm: str = "bn", **kwargs) -> DeepLab:
    torch.manual_seed(0)
    return DeepLab(1, 11, norm=norm, widths=(8, 8, 16), aspp_channels=8, **kwargs)


def test_deeplab_predicts_every_pixel_and_its_aspp_has_an_image_pooling_branch():
    model = _deeplab()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 11, 32, 32)
    pooling = model.aspp.image_pool
    assert isinstance(pooling.pool, nn.AdaptiveAvgPool2d)
    assert isinstance(pooling.project[1], nn.BatchNorm2d)
    seen = []
    pooling.project[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model(torch.randn(3, 1, 32, 32))
    assert seen == [(3, 8, 1, 1)]  # one value per channel per image


def test_per_rank_bn_cannot_train_image_pooling_at_one_image_and_the_config_says_so():
    """What happens with plain BN at one image per GPU: PyTorch refuses; train.py refuses first,
    naming the fixes (SyncBN, or no norm in that branch as detectron2)."""
    model = _deeplab().train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model(torch.randn(1, 1, 32, 32))
    assert "model.image_pool_norm=false" in model.check_batch(1)
    assert model.check_batch(2) is None and _deeplab("syncbn").check_batch(1) is None
    without = _deeplab(image_pool_norm=False).train()
    assert without(torch.randn(1, 1, 32, 32)).shape == (1, 11, 32, 32)
    assert isinstance(without.aspp.image_pool.project[1], nn.Identity)
    assert without.aspp.image_pool.project[0].bias is not None  # the conv got a bias instead


def test_per_rank_bn_at_two_images_turns_the_pooling_branch_into_plus_minus_one():
    """At two images per rank BN maps each channel of the pooled vector to exactly -1 and +1:
    whatever the images hold, the branch passes one bit per channel."""
    bn = nn.BatchNorm2d(8, eps=1e-12).train()
    out = bn(torch.randn(2, 8, 1, 1) * 10 + 3).flatten(1)
    torch.testing.assert_close(out.abs(), torch.ones(2, 8), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0], -out[1])


def _deeplab_one_image_per_rank() -> dict:
    """On each rank: the SyncBN DeepLab trained for one step on this rank's single image."""
    rank = dist.get_rank()
    model = syncbn.convert_sync_batchnorm(_deeplab("syncbn")).train()
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 11, (2, 32, 32), generator=torch.Generator().manual_seed(2))
    ddp = nn.parallel.DistributedDataParallel(model)
    loss = nn.functional.cross_entropy(ddp(images[rank : rank + 1]), targets[rank : rank + 1])
    loss.backward()
    return {
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


def test_syncbn_trains_deeplab_at_one_image_per_rank_as_bn_does_on_the_global_batch(run_ranks):
    """2 gloo ranks x 1 image with SyncBN = 1 process x 2 images with BN: the same losses,
    gradients (DDP's average) and running statistics, the image-pooling branch included."""
    ranks = run_ranks(_deeplab_one_image_per_rank, 2)
    reference = _deeplab().train()
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 11, (2, 32, 32), generator=torch.Generator().manual_seed(2))
    per_image = nn.functional.cross_entropy(reference(images), targets, reduction="none")
    per_image.mean(dim=(1, 2)).mean().backward()  # DDP averages the two ranks' mean losses
    losses = per_image.detach().mean(dim=(1, 2))
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["loss"], losses[rank], rtol=1e-5, atol=1e-6)
        for name, param in reference.named_parameters():
            # float32 sums in another order (two ranks' halves, then DDP's average): 1e-5
            # absolute is a few ulps of the largest gradients (~0.1), as measured on 2 cores
            torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-4, atol=1e-5,
                                       msg=f"{name} on rank {rank}")  # fmt: skip
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(result["buffers"][name], buffer, rtol=1e-5, atol=1e-6)


def test_deeplab_norm_none_has_no_norm_layers_and_biased_convolutions():
    model = _deeplab("none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    copy.deepcopy(model)(torch.randn(1, 1, 16, 16)).sum().backward()


def test_train_py_refuses_per_rank_bn_at_one_image_before_training(tmp_path):
    from syncbn.training import loop

    cfg = compose_config(f"run_dir={tmp_path}", "task=segmentation", "norm=bn",
                         "trainer.batch_size=2", "trainer.accumulate=2", "logger.mode=disabled",
                         "data.num_train=8", "data.num_val=2")  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"DeepLab with norm=bn expected more than 1 image per "
        r"rank and micro-batch \(got trainer.batch_size=2, trainer.accumulate=2\)",
    ):
        loop.run(cfg)
    assert not (tmp_path / "checkpoints").exists()
