"""Per-step losses kept on the device and read a few steps at a time: no host sync per step.

Each training step records its loss sum, the count it averages over and (``nonfinite=skip``)
whether its update was dropped, into a small device buffer. Every ``trainer.sync_every`` steps,
and before anything that needs them (an evaluation, a checkpoint, the end), :meth:`StepLog.read`
all-reduces the buffer with each rank's stop request and whether its parameters are all finite
appended (one collective of ``3k + 2`` values for ``k`` pending steps) and reads it on the host
(one device-to-host copy). On a GPU the host thus waits for the device once per ``sync_every``
steps instead of every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepRecord:
    step: int
    lr: float
    loss: float  # the global-batch mean loss: sum over ranks of loss sums / of counts
    skipped: bool  # the update was dropped on the device (nonfinite=skip)
    model_finite: bool = True  # the parameters after this step (checked at the sync's last step)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and not self.skipped


class StepLog:
    """Up to ``capacity`` steps of ``[loss sum, count, skipped]`` on ``device``."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity = capacity
        self.buffer = torch.zeros(3, capacity, dtype=torch.float64, device=device)
        self.pending: list[tuple[int, float]] = []  # (step, lr) of the recorded steps

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.capacity

    def record(self, step: int, lr: float, loss_sum, count, skipped=None) -> None:
        """Note step ``step``'s loss sum, count and skip verdict (device tensors or numbers:
        nothing is read here)."""
        if self.full:
            raise RuntimeError(f"StepLog expected a read every {self.capacity} steps (got more)")
        i = len(self.pending)
        for row, value in enumerate((loss_sum, count, 0.0 if skipped is None else skipped)):
            if isinstance(value, torch.Tensor):
                self.buffer[row, i].copy_(value.detach())
            else:
                self.buffer[row, i] = float(value)
        self.pending.append((step, lr))

    def read(
        self, world_size: int, stop_requested: bool, parameters=()
    ) -> tuple[list[StepRecord], bool]:
        """The pending steps with their global losses, and whether any rank asked to stop.

        The last record's ``model_finite`` says whether ``parameters`` (this rank's: the same on
        every rank under DDP) hold only finite values after that step, on every rank. A
        collective: every rank calls it at the same steps.
        """
        n = len(self.pending)
        device = self.buffer.device
        stop = torch.tensor([float(stop_requested)], dtype=torch.float64, device=device)
        packed = torch.cat([self.buffer[:, :n].flatten(), stop, _not_finite(parameters, device)])
        if world_size > 1:  # (3n + 2,): losses, counts, skips, stop, bad parameters
            dist.all_reduce(packed)
        values = packed.tolist()
        sums, counts, skipped = values[:n], values[n : 2 * n], values[2 * n : 3 * n]
        records = [
            StepRecord(step, lr, s / c if c > 0 else math.nan, k > 0)
            for (step, lr), s, c, k in zip(self.pending, sums, counts, skipped, strict=True)
        ]
        if records:
            records[-1].model_finite = values[-1] == 0
        self.pending.clear()
        return records, values[-2] > 0


def _not_finite(parameters, device: torch.device) -> torch.Tensor:
    """``[1.]`` when any of ``parameters`` holds NaN/Inf, else ``[0.]`` (float64, on the device,
    nothing read on the host). One ``isfinite().all()`` per tensor: only at syncs."""
    flags = [torch.isfinite(p.detach()).all() for p in parameters]
    if not flags:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return (~torch.stack(flags).all()).to(device, torch.float64).reshape(1)
