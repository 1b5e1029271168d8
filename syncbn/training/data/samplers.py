"""Which samples each rank reads: one epoch permutation cut into global batches, and exact shards.

Training reads :class:`EpochSampler` (the current epoch's :class:`EpochShard`, switched with
:meth:`EpochSampler.set_epoch` so one DataLoader, and its worker processes, serve the whole run);
evaluation reads :class:`ShardSampler` (every sample once across the ranks, no padding).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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


class EpochSampler(Sampler[tuple[int, int]]):
    """The training sampler of a whole run: :class:`EpochShard` of the epoch set last.

    Yields ``(index, epoch)`` keys: the dataset seeds each sample's augmentation with them
    (:class:`syncbn.training.data.Samples`), so what a sample looks like depends on the run's
    seed, the epoch and the sample, never on the rank, the world size, the worker or the batch.
    The sampler runs in the main process, so :meth:`set_epoch` also reaches persistent workers.
    """

    def __init__(self, length: int, rank: int, world_size: int, batch_size: int, seed: int):
        self.length, self.rank, self.world_size = length, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Read epoch ``epoch`` from sample ``start`` of its permutation on."""
        self.epoch = epoch
        self.shard = EpochShard(
            self.length, self.rank, self.world_size, self.batch_size, self.seed, epoch, start
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((i, epoch) for i in self.shard.indices)

    def __len__(self) -> int:
        return len(self.shard)


def steps_in_epoch(length: int, global_batch: int, start: int = 0) -> int:
    """Full global batches left in an epoch of ``length`` samples after ``start`` of them."""
    return max(0, (length - start) // global_batch)
