"""Tasks: what differs between classification and segmentation, behind one small interface.

A task (``task=classification|segmentation``, ``conf/task/``) supplies the loss and the
metrics; its config file also picks its default dataset and model (``task=segmentation``:
``data=digit_scenes model=deeplab``). The training loop (:mod:`syncbn.training.loop`) calls only:

- ``task.loss(output, target) -> (mean loss, count)``: the loss to backpropagate, averaged over
  the ``count`` elements that count (samples; labelled pixels);
- ``task.meter(device)``: an accumulator with ``update(output, target)`` and
  ``compute(world_size) -> dict`` (one all-reduce), whose keys become ``val_<key>`` in
  metrics.json and ``val/<key>`` in W&B (``loss``, ``acc`` and ``count`` always);
- ``task.primary``: the metric train.py returns to Hydra sweepers (``acc``, ``miou``), and
  ``task.describe(metrics)``: that part of the rank-0 log line.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Meter, Task
from .classification import Classification
from .segmentation import Segmentation

TASKS: dict[str, type[Task]] = {"classification": Classification, "segmentation": Segmentation}

__all__ = ["TASKS", "Classification", "Meter", "Segmentation", "Task", "build"]


def build(cfg, splits) -> Task:
    """The task ``cfg`` (a ``task`` config) names, for the data of ``splits``."""
    name = str(cfg.name)
    if name not in TASKS:
        raise ConfigError(f"task.name expected one of {tuple(TASKS)} (got {name!r})")
    return TASKS[name](cfg, splits)
