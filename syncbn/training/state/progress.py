"""How far a run is, counted in samples, and how far it has to go.

Progress is the position in the data, not a step count: ``epoch`` (whose permutation is being
read), ``epoch_offset`` (samples of that permutation consumed) and ``samples`` (consumed in
all). A step consumes one global batch ``G = world size x trainer.batch_size``. Because the data
order does not depend on ``G`` (:class:`syncbn.training.data.EpochShard`), a run stopped on 2
ranks and resumed on 3 continues from the same sample, and

- ``trainer.epochs=E`` trains E passes over the data whatever ``G`` was along the way (each
  pass drops a tail shorter than one global batch);
- ``trainer.max_steps=S`` trains ``S x G_ref`` samples, ``G_ref`` being the global batch of the
  run's first launch (``reference_global_batch``): the same amount of data, in more or fewer
  optimizer steps when ``G`` changed (the last step may overshoot by less than one ``G``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..data import steps_in_epoch


@dataclass
class RunState:
    """Everything about a run's progress that a checkpoint carries besides the tensors."""

    reference_global_batch: int  # G_ref: max_steps and optim.warmup_steps count in it
    epoch: int = 0
    epoch_offset: int = 0  # samples of this epoch's permutation already consumed
    samples: int = 0  # training samples consumed, all ranks together
    step: int = 0  # optimizer steps taken (skipped non-finite ones included)
    train_time_s: float = 0.0
    train_loss_history: list[float] = field(default_factory=list)  # global mean loss, every step
    val_history: list[dict] = field(default_factory=list)  # {"step", "loss", "acc"} per evaluation
    bn_telemetry: list[dict] = field(default_factory=list)  # {"step", "bn/...": value}
    skipped_steps: list[int] = field(default_factory=list)  # steps with a non-finite loss
    best: dict | None = None  # {"metric", "value", "step"} of the best evaluation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], global_batch: int) -> RunState:
        """The state a checkpoint holds. Checkpoints written before progress was counted in
        samples (no ``samples`` key) were written at epoch ends: ``step x global_batch``."""
        values = {f.name: saved[f.name] for f in fields(cls) if f.name in saved}
        values.setdefault("reference_global_batch", global_batch)
        state = cls(**values)
        if "samples" not in saved:
            state.samples = state.step * global_batch
        return state


def total_samples(trainer, state: RunState, dataset_size: int, global_batch: int) -> int:
    """The samples the whole run trains, as planned from ``state`` on with this global batch."""
    if trainer.max_steps is not None:
        return trainer.max_steps * state.reference_global_batch
    if state.epoch >= trainer.epochs:
        return state.samples
    per_epoch = steps_in_epoch(dataset_size, global_batch) * global_batch
    rest = steps_in_epoch(dataset_size, global_batch, state.epoch_offset) * global_batch
    return state.samples + rest + (trainer.epochs - state.epoch - 1) * per_epoch


def finished(trainer, state: RunState) -> bool:
    if trainer.max_steps is not None:
        return state.samples >= trainer.max_steps * state.reference_global_batch
    return state.epoch >= trainer.epochs
