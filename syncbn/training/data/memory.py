"""Datasets held in memory as tensors: scikit-learn's digits, synthetic patterns, CIFAR-10.

Inputs are normalized with the mean and standard deviation of the *training* split only
(:func:`normalize`); the validation split is mapped with the same numbers, so nothing about it
leaks into training.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import ConfigError
from .base import Splits, TensorSource, identity, splits
from .transforms import ShiftFlip


def normalize(train: torch.Tensor, val: torch.Tensor, per_channel: bool = False):
    """``(train - m) / s`` and ``(val - m) / s`` with ``m, s`` the training split's mean and
    (unbiased) standard deviation, over everything or per channel (dim 1). Returns the two
    tensors and ``(m, s)``."""
    dims = (0, 2, 3) if per_channel else tuple(range(train.ndim))
    mean = train.mean(dim=dims, keepdim=per_channel)
    std = train.std(dim=dims, keepdim=per_channel)
    return (train - mean) / std, (val - mean) / std, (mean, std)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``range(n)``: ``(train, val)`` indices."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def _in_memory(cfg, x, y, train, val, channels: int, classes: int, seed, augment) -> Splits:
    x_train, x_val, (mean, std) = normalize(x[train], x[val])
    blank = float((0 - mean) / std)  # a pixel of value 0 (the background of digits)
    return splits(
        TensorSource(x_train, y[train]), TensorSource(x_val, y[val]),
        ShiftFlip(cfg.augment_shift, cfg.augment_flip, fill=blank), identity,
        channels, classes, seed, augment,
    )  # fmt: skip


def digits(cfg, seed: int | None, augment: bool) -> Splits:
    """scikit-learn's bundled 1797 handwritten 8x8 digits: real data, shipped with the package."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.tensor(raw.target, dtype=torch.long)
    train, val = split_indices(len(x), cfg.val_fraction, cfg.split_seed)
    return _in_memory(cfg, x, y, train, val, 1, 10, seed, augment)


def synthetic(cfg, seed: int | None, augment: bool) -> Splits:
    """Gaussian images whose class shifts the mean of a random pattern: learnable, any size."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    patterns = torch.randn((cfg.num_classes, *shape), generator=gen)
    y = torch.randint(cfg.num_classes, (cfg.num_samples,), generator=gen)
    x = patterns[y] * 0.5 + torch.randn((cfg.num_samples, *shape), generator=gen)
    train, val = split_indices(len(x), cfg.val_fraction, cfg.split_seed)
    return _in_memory(cfg, x, y, train, val, cfg.channels, cfg.num_classes, seed, augment)


def cifar10(cfg, seed: int | None, augment: bool) -> Splits:
    """CIFAR-10 from the standard python-pickle batches under ``data.root`` (no download)."""
    root = Path(cfg.root).expanduser() if cfg.root else None
    folder = root / "cifar-10-batches-py" if root else None
    if folder is None or not (folder / "data_batch_1").is_file():
        raise ConfigError(
            f"data=cifar10 expected the python-version CIFAR-10 batches at "
            f"<data.root>/cifar-10-batches-py/data_batch_1 (got data.root={cfg.root!r}); download "
            f"cifar-10-python.tar.gz, extract it, and pass data.root=/path/to/its/parent"
        )
    xs, ys = zip(*(_cifar_batch(f) for f in sorted(folder.glob("data_batch_*"))), strict=True)
    x_val, y_val = _cifar_batch(folder / "test_batch")
    x_train, x_val, _ = normalize(torch.cat(xs), x_val, per_channel=True)
    return splits(
        TensorSource(x_train, torch.cat(ys)), TensorSource(x_val, y_val),
        ShiftFlip(cfg.augment_shift, cfg.augment_flip), identity, 3, 10, seed, augment,
    )  # fmt: skip


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = torch.as_tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32)
    return data.float() / 255.0, torch.as_tensor(batch[b"labels"], dtype=torch.long)
