"""Datasets (digits, synthetic, CIFAR-10 from local pickles) and their distributed loaders."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

DATASETS = ("digits", "synthetic", "cifar10")


@dataclass
class Splits:
    train: TensorDataset
    val: TensorDataset
    in_channels: int
    num_classes: int


def load(cfg) -> Splits:
    """The configured dataset as normalized float tensors, split into train and validation."""
    if cfg.name == "digits":
        return _digits(cfg)
    if cfg.name == "synthetic":
        return _synthetic(cfg)
    if cfg.name == "cifar10":
        return _cifar10(cfg)
    raise ValueError(f"data.name expected one of {DATASETS} (got {cfg.name!r})")


def _split(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int, channels: int, classes: int
):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(x) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Splits(
        TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), channels, classes
    )


def _digits(cfg) -> Splits:
    """scikit-learn's bundled 1797 handwritten 8x8 digits: real data, shipped with the package."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    return _split(x, y, cfg.val_fraction, cfg.split_seed, 1, 10)


def _synthetic(cfg) -> Splits:
    """Gaussian images whose class shifts the mean of a random pattern: learnable, any size."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    patterns = torch.randn((cfg.num_classes, *shape), generator=gen)
    y = torch.randint(cfg.num_classes, (cfg.num_samples,), generator=gen)
    x = patterns[y] * 0.5 + torch.randn((cfg.num_samples, *shape), generator=gen)
    return _split(x, y, cfg.val_fraction, cfg.split_seed, cfg.channels, cfg.num_classes)


def _cifar10(cfg) -> Splits:
    """CIFAR-10 from the standard python-pickle batches under ``data.root`` (no download)."""
    root = Path(cfg.root).expanduser() if cfg.root else None
    folder = root / "cifar-10-batches-py" if root else None
    if folder is None or not (folder / "data_batch_1").is_file():
        raise FileNotFoundError(
            f"data=cifar10 expected the python-version CIFAR-10 batches at "
            f"<data.root>/cifar-10-batches-py/data_batch_1 (got data.root={cfg.root!r}); download "
            f"cifar-10-python.tar.gz, extract it, and pass data.root=/path/to/its/parent"
        )
    train_files = sorted(folder.glob("data_batch_*"))
    xs, ys = zip(*(_cifar_batch(f) for f in train_files), strict=True)
    x_train, y_train = torch.cat(xs), torch.cat(ys)
    x_val, y_val = _cifar_batch(folder / "test_batch")
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    normalize = lambda t: (t - mean) / std  # noqa: E731
    return Splits(
        TensorDataset(normalize(x_train), y_train), TensorDataset(normalize(x_val), y_val), 3, 10
    )


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = torch.as_tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32)
    return data.float() / 255.0, torch.as_tensor(batch[b"labels"], dtype=torch.long)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, ...`` with no padding: each sample is evaluated exactly once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochShard(Sampler[int]):
    """This rank's part of one epoch's global batches, starting ``start`` samples into the epoch.

    The epoch's order is one permutation of the ``length`` samples, seeded by ``seed + epoch``
    (the same on every rank, whatever the world size). Global batch ``k`` is the positions
    ``[start + k G, start + (k + 1) G)`` of it, ``G = world_size * batch_size``, and rank ``r``
    takes every ``world_size``-th of them from the ``r``-th on. So

    - the ranks' k-th batches together are exactly the k-th batch of ``G`` a single process
      would draw: 2 ranks x 8 see the same global batches as 1 process x 16;
    - progress is a sample offset into the permutation, so a run stopped after ``start``
      samples resumes there on any number of ranks and any batch size;
    - a tail shorter than one global batch is dropped (as ``drop_last``): ``steps`` full
      global batches per epoch.
    """

    def __init__(
        self, length: int, rank: int, world_size: int, batch_size: int, seed: int, epoch: int,
        start: int = 0,
    ):  # fmt: skip
        self.steps = max(0, (length - start) // (world_size * batch_size))
        order = torch.randperm(length, generator=torch.Generator().manual_seed(seed + epoch))
        stop = start + self.steps * world_size * batch_size
        self.indices = order[start + rank : stop : world_size].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def steps_in_epoch(length: int, global_batch: int, start: int = 0) -> int:
    """Full global batches left in an epoch of ``length`` samples after ``start`` of them."""
    return max(0, (length - start) // global_batch)


def train_loader(
    dataset, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, start: int = 0
) -> DataLoader:
    """This rank's batches of epoch ``epoch`` from sample ``start`` on (see :class:`EpochShard`)."""
    sampler = EpochShard(len(dataset), rank, world_size, batch_size, seed, epoch, start)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)


def eval_loader(dataset, batch_size: int, rank: int, world_size: int) -> DataLoader:
    """Every sample of ``dataset`` exactly once across the ranks (no padding), in order."""
    sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=max(batch_size, 256), sampler=sampler)


def augment(
    x: torch.Tensor, max_shift: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padded), optional horizontal flip.

    One draw per batch, from ``generator`` (the global RNG when None).
    """
    if max_shift > 0:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, [max_shift] * 4)
        dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
        x = padded[:, :, dy : dy + h, dx : dx + w]
    if flip and torch.rand((), generator=generator) < 0.5:
        x = x.flip(3)
    return x.contiguous()
