"""Models by import path: ``model._target_=pkg.module.Class`` (a class or a factory function).

:func:`build_model` instantiates the configured target with Hydra (its arguments are the other
keys of the ``model`` config: ``+model.ARG=value`` on the command line), tells it what the data
says and the target accepts, and converts its BatchNorm layers for ``norm=syncbn``:

- ``num_classes``: passed when the target takes it by name or through ``**kwargs``
  (torchvision's ``resnet50(**kwargs)``, ``timm.create_model(name, **kwargs)``);
- ``in_channels`` / ``in_chans`` (timm's name): passed only when the target names it (a
  ``**kwargs`` may not accept it); for timm set ``+model.in_chans=...`` yourself;
- ``norm`` (``syncbn``/``bn``/``none``): passed when the target names it (the built-in
  models, which then build BatchNorm2d or nothing). A model that builds its own BatchNorm layers
  works with ``norm=bn`` and ``norm=syncbn``; ``norm=none`` needs a model that takes ``norm``.

A value the config gives explicitly wins, except a ``num_classes`` that disagrees with the data
(an error).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ...batchnorm import SyncBatchNorm
from ...convert import convert_sync_batchnorm
from ...distributed import new_sync_group
from ..errors import ConfigError
from .deeplab import DeepLab
from .resnet import BasicBlock, ResNet, norm_factory

DEFAULT_TARGET = "syncbn.training.models.ResNet"

__all__ = ["BasicBlock", "DeepLab", "ResNet", "build_model", "norm_factory"]


def build_model(
    cfg,
    norm: str,
    in_channels: int,
    num_classes: int,
    sync_group_size: int | None = None,
    debug: bool | None = None,
    check_finite: bool | None = None,
) -> nn.Module:
    """The configured model; with ``norm=syncbn`` its BatchNorms become SyncBatchNorm.

    ``debug`` and ``check_finite`` switch SyncBatchNorm's checks on or off (``None``: the
    ``SYNCBN_DEBUG`` / ``SYNCBN_CHECK_FINITE`` environment decides).
    """
    cfg = _as_config(cfg)
    target = str(cfg._target_)
    factory = _import(target)
    given = _arguments(factory, target, cfg, str(norm), in_channels, num_classes)
    try:
        model = instantiate(cfg, **given)
    except InstantiationException as error:
        cause = error.__cause__ or error
        why = " ".join(str(cause).split())
        raise ConfigError(
            f"model._target_={target} could not be built with the arguments "
            f"{sorted({*_own_keys(cfg), *given})} ({type(cause).__name__}: {why}); pass its "
            f"arguments as +model.ARG=value, or start from model=custom (no arguments)"
        ) from error
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_={target} expected to return a torch.nn.Module (got "
            f"{type(model).__name__})"
        )
    if norm == "syncbn":
        group = new_sync_group(sync_group_size) if sync_group_size else None
        model = convert_sync_batchnorm(model, process_group=group)
        for layer in model.modules():
            if isinstance(layer, SyncBatchNorm):
                if debug is not None:
                    layer.debug = bool(debug)
                if check_finite is not None:
                    layer.check_finite = bool(check_finite)
    return model


def _as_config(cfg) -> DictConfig:
    """The model config with a ``_target_`` (configs written before it had one: the ResNet)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    plain = {k: v for k, v in dict(plain).items() if k != "defaults"}
    plain.setdefault("_target_", DEFAULT_TARGET)
    return OmegaConf.create(plain)


def _own_keys(cfg: DictConfig) -> list[str]:
    return [k for k in cfg if not str(k).startswith("_")]


def _import(target: str) -> Callable:
    """The object at ``pkg.module.name`` (or ``pkg.module.Class.method``)."""
    try:
        return _locate(target)
    except Exception as error:  # noqa: BLE001 - any import failure becomes one message
        hint = ""
        if target.split(".")[0] in ("torchvision", "timm"):
            hint = " (install the optional extra: pip install 'syncbn[vision]')"
        raise ConfigError(
            f"model._target_ expected an importable class or function (got {target!r}: "
            f"{type(error).__name__}: {error}){hint}"
        ) from error


def _locate(path: str):
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and not module_name.startswith(error.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(f"No module named {parts[0]!r}", name=parts[0])


def _parameters(factory: Callable) -> tuple[set[str], bool]:
    """Names ``factory`` takes, and whether it takes ``**kwargs`` (unknown: True)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return set(), True
    kinds = {p.kind for p in signature.parameters.values()}
    named = {
        name for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }  # fmt: skip
    return named, inspect.Parameter.VAR_KEYWORD in kinds


def _arguments(
    factory: Callable, target: str, cfg: DictConfig, norm: str, in_channels: int, num_classes: int
) -> dict[str, Any]:
    """What train.py tells the model (see the module docstring)."""
    named, var_keyword = _parameters(factory)
    given: dict[str, Any] = {}
    if "num_classes" in cfg:
        if cfg.num_classes != num_classes:
            raise ConfigError(
                f"model.num_classes expected the data's {num_classes} classes (got "
                f"{cfg.num_classes}); drop the key: train.py passes the data's count"
            )
    elif "num_classes" in named or var_keyword:
        given["num_classes"] = num_classes
    for name in ("in_channels", "in_chans"):
        if name in named and name not in cfg:
            given[name] = in_channels
    if "norm" in named and "norm" not in cfg:
        given["norm"] = norm
    elif "norm" not in named and norm == "none":
        raise ConfigError(
            f"norm=none expected a model that takes a `norm` argument (got model._target_="
            f"{target}, which builds its own norm layers); use norm=bn or norm=syncbn with it"
        )
    return given


def count_norm_layers(model: nn.Module) -> int:
    """BatchNorm-like layers (``nn.BatchNorm*d``, ``nn.SyncBatchNorm``, ours) in ``model``."""
    kinds = (nn.modules.batchnorm._BatchNorm, SyncBatchNorm)
    return sum(isinstance(m, kinds) for m in model.modules())


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D parameters and buffers in channels_last memory format."""
    return model.to(memory_format=torch.channels_last)
