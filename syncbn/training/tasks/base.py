"""The task interface (see :mod:`syncbn.training.tasks`)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Meter:
    """Sums on the device during an evaluation; :meth:`compute` reduces them over the ranks once.

    Subclasses fill ``self.sums`` (float64, every entry a sum over samples) in :meth:`update` and
    turn the reduced sums into metrics in :meth:`metrics`.
    """

    def __init__(self, size: int, device: torch.device):
        self.sums = torch.zeros(size, dtype=torch.float64, device=device)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self, world_size: int) -> dict:
        """All ranks' sums (one all-reduce, one read) as metrics; call on every rank."""
        if world_size > 1:
            dist.all_reduce(self.sums)
        return self.metrics(self.sums.cpu())

    def metrics(self, sums: torch.Tensor) -> dict:
        raise NotImplementedError


class Task:
    """What a task supplies to the loop; see :mod:`syncbn.training.tasks`."""

    name: str
    datasets: tuple[str, ...]  # the ``data=`` choices it can train on
    primary: str  # its headline metric

    def __init__(self, cfg, splits):
        self.num_classes = splits.num_classes
        self.label_smoothing = float(cfg.label_smoothing)

    def loss(self, output: torch.Tensor, target: torch.Tensor):
        raise NotImplementedError

    def meter(self, device: torch.device) -> Meter:
        raise NotImplementedError

    def describe(self, metrics: dict) -> str:
        raise NotImplementedError
