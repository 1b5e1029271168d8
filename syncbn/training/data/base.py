"""What every dataset provides: a source of raw samples, a transform, and the three splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

Transform = Callable[[tuple, "np.random.Generator | None"], tuple[torch.Tensor, torch.Tensor]]


class TensorSource(Dataset):
    """Samples held in memory: ``(x[i], y[i])``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"TensorSource expected as many targets as inputs (got {len(y)} "
                             f"targets for {len(x)} inputs)")  # fmt: skip
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


class Samples(Dataset):
    """A split as the loaders see it: ``transform(source[index], rng)``.

    Keys are an index, or ``(index, epoch)`` (what :class:`~.samplers.EpochSampler` yields).
    With ``seed`` set and an ``(index, epoch)`` key, ``rng`` is a generator seeded by
    ``(seed, epoch, index)``: every sample gets its own augmentation draw, the same whatever the
    rank, world size, batch or DataLoader worker that loads it, so a resumed run (even on another
    number of ranks) sees exactly the augmented samples an uninterrupted one sees. Otherwise
    ``rng`` is None: the transform's deterministic (evaluation) path.
    """

    def __init__(self, source: Dataset, transform: Transform, seed: int | None = None):
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        rng = None
        if self.seed is not None and epoch is not None:
            rng = np.random.default_rng((self.seed, epoch, index))
        return self.transform(self.source[index], rng)


@dataclass
class Splits:
    """A dataset's splits, ready for the loaders.

    ``train`` augments (when asked to); ``train_eval`` is the same samples as evaluation sees
    them (PreciseBN, ``trainer.eval_train``); ``val`` is the validation split.
    """

    train: Samples
    train_eval: Samples
    val: Samples
    in_channels: int
    num_classes: int
    ignore_index: int | None = None  # target value that no loss or metric counts (segmentation)
    class_names: list[str] | None = None


def splits(
    train: Dataset, val: Dataset, train_transform: Transform, eval_transform: Transform,
    in_channels: int, num_classes: int, seed: int | None, augment: bool, **extra,
) -> Splits:  # fmt: skip
    """Wrap sources and transforms into :class:`Splits`; ``augment=False`` trains on the
    evaluation transform."""
    return Splits(
        train=Samples(train, train_transform if augment else eval_transform, seed),
        train_eval=Samples(train, eval_transform),
        val=Samples(val, eval_transform),
        in_channels=in_channels,
        num_classes=num_classes,
        **extra,
    )


def identity(sample, rng):
    """The evaluation transform of in-memory data: already normalized tensors."""
    return sample
