"""Datasets (``data=digits|synthetic|cifar10|imagefolder|digit_scenes``) and their loaders.

:func:`load` builds a dataset's :class:`Splits`; :func:`train_loader` and :func:`eval_loader`
wrap them in DataLoaders (workers, pinned memory, prefetch from the ``loader`` config) with the
distributed samplers of :mod:`.samplers`.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .base import Samples, Splits, TensorSource
from .imagefolder import imagefolder
from .memory import cifar10, digits, normalize, synthetic
from .samplers import EpochSampler, EpochShard, ShardSampler, steps_in_epoch
from .scenes import digit_scenes

LOADERS = {
    "digits": digits,
    "synthetic": synthetic,
    "cifar10": cifar10,
    "imagefolder": imagefolder,
    "digit_scenes": digit_scenes,
}

__all__ = [
    "EpochSampler", "EpochShard", "Samples", "ShardSampler", "Splits", "TensorSource",
    "eval_loader", "load", "normalize", "steps_in_epoch", "train_loader",
]  # fmt: skip


def load(cfg, seed: int | None = None, augment: bool = True) -> Splits:
    """The dataset ``cfg`` (a ``data`` config) describes. ``seed`` seeds the per-sample
    augmentation of the training split (``augment=False``: none)."""
    name = str(cfg.name)
    if name not in LOADERS:
        raise ConfigError(f"data.name expected one of {tuple(LOADERS)} (got {name!r})")
    return LOADERS[name](cfg, seed, augment)


def _loader_options(cfg, device: torch.device | None) -> dict:
    """DataLoader keyword arguments from the ``loader`` config (None: the defaults)."""
    if cfg is None:
        return {}
    workers = int(cfg.workers)
    pin = (
        cfg.pin_memory
        if cfg.pin_memory is not None
        else (device is not None and device.type == "cuda")
    )
    options = {"num_workers": workers, "pin_memory": bool(pin)}
    if workers > 0:
        options |= {"persistent_workers": bool(cfg.persistent_workers),
                    "prefetch_factor": int(cfg.prefetch_factor)}  # fmt: skip
    return options


def train_loader(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, loader_cfg=None,
    device: torch.device | None = None,
) -> DataLoader:  # fmt: skip
    """This rank's training batches for the whole run; ``loader.sampler.set_epoch(epoch,
    start)`` before each pass chooses the epoch and the sample to start from
    (:class:`EpochSampler`)."""
    sampler = EpochSampler(len(dataset), rank, world_size, batch_size, seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      **_loader_options(loader_cfg, device))  # fmt: skip


def eval_loader(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, loader_cfg=None,
    device: torch.device | None = None,
) -> DataLoader:  # fmt: skip
    """Every sample of ``dataset`` exactly once across the ranks (no padding), in order."""
    sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      **_loader_options(loader_cfg, device))  # fmt: skip
