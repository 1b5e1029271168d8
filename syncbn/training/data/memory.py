"""Datasets held in memory as tensors: scikit-learn's digits, synthetic patterns, CIFAR-10.

Inputs are normalized with the mean and standard deviation of the *training* split only
(:func:`normalize`); the validation split is mapped with the same numbers, so nothing about it
leaks into training.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .base import Splits, TensorSource, identity, splits
from .transforms import ShiftFlip

PEAK_COPIES = 4  # building and normalizing a split holds about this many copies of it at once


def available_bytes() -> int:
    """Memory this process may still take: MemAvailable, capped by a cgroup v2 limit."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def check_fits(what: str, values: int, bytes_per_value: int) -> None:
    """Raise :class:`ConfigError` before allocating an in-memory dataset of ``values`` numbers
    (``what`` names the keys that make them) that would not fit: every rank of this node
    builds its own copy, and building holds about :data:`PEAK_COPIES` copies at once."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    size = values * bytes_per_value
    needed = size * PEAK_COPIES * ranks
    available = available_bytes()
    if needed > available:
        raise ConfigError(
            f"{what} = {values} values ({_size(size)}; about {_size(needed)} while {ranks} "
            f"rank(s) of this node build it) expected to fit in memory (got {_size(available)} "
            f"available); make it smaller, or use data=imagefolder, which reads images from disk "
            f"as it goes"
        )


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


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 1797 handwritten 8x8 digits as ``(images (1797, 8, 8) float32 in
    0..16, labels (1797,) long)``, read from the package's data file: importing scikit-learn
    costs more than a second per process, the file a few milliseconds (``load_digits`` itself
    when the file is not where scikit-learn 1.x keeps it)."""
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0], "datasets", "data", "digits.csv.gz") if folders else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 64 pixels, then the label
        images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits as sklearn_digits

        raw = sklearn_digits()
        images, labels = raw.images, raw.target
    return torch.tensor(images, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)


def digits(cfg, seed: int | None, augment: bool) -> Splits:
    """scikit-learn's bundled 1797 handwritten 8x8 digits: real data, shipped with the package."""
    images, y = load_digits()
    x = images.unsqueeze(1)  # (1797, 1, 8, 8)
    train, val = split_indices(len(x), cfg.val_fraction, cfg.split_seed)
    return _in_memory(cfg, x, y, train, val, 1, 10, seed, augment)


def synthetic(cfg, seed: int | None, augment: bool) -> Splits:
    """Gaussian images whose class shifts the mean of a random pattern: learnable, any size."""
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    check_fits("data.num_samples x data.channels x data.image_size^2",
               cfg.num_samples * cfg.channels * cfg.image_size**2, 4)  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.split_seed)
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
