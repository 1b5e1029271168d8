"""Which checkpoints a run keeps: ``last.pt``, the newest K ``step-*.pt`` and ``best.pt``.

Every checkpoint is written once, as ``checkpoints/step-<step>.pt``; ``last.pt`` is then made a
hard link to it (no second write), and step files beyond the newest ``keep_last`` are deleted
(``last.pt`` and ``best.pt`` keep their data through their own links). ``best.pt`` is the
training state at the evaluation with the best validation metric so far (``acc``, ``top5``,
``miou``: highest; ``loss``: lowest); it is linked to the step file of the same step when
there is one, written otherwise. Only one process (rank 0) writes; all file operations are atomic
(:mod:`syncbn.training.state.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import checkpoint

log = logging.getLogger(__name__)

BEST = "best.pt"
HIGHER_IS_BETTER = ("acc", "top5", "miou")
_STEP = re.compile(r"^step-(\d+)\.pt$")


def step_files(directory: Path) -> list[Path]:
    """The ``step-*.pt`` files of ``directory``, oldest step first."""
    found = [(int(m.group(1)), p) for p in directory.glob("step-*.pt")
             if (m := _STEP.match(p.name))]  # fmt: skip
    return [p for _, p in sorted(found)]


class CheckpointManager:
    """Writes and prunes the checkpoints of one run directory.

    Args:
        directory: ``run_dir/checkpoints``.
        keep_last: how many ``step-*.pt`` files to keep (the newest). ``trainer.keep_last``.
        best_metric: ``"acc"``, ``"top5"``, ``"miou"`` (max), ``"loss"`` (min) or None (no
            ``best.pt``).
        writer: whether this process writes (rank 0); the others only track the best value.
    """

    def __init__(self, directory: Path, keep_last: int, best_metric: str | None, writer: bool):
        self.directory = directory
        self.keep_last = keep_last
        self.best_metric = None if best_metric is None else str(best_metric)
        self.writer = writer
        self._saved_step: int | None = None  # the step this process last saved

    @property
    def last(self) -> Path:
        return self.directory / checkpoint.LAST

    def step_path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}.pt"

    def save(self, state: dict[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``state["step"]``, point ``last.pt`` at it."""
        path = self.step_path(state["step"])
        if self.writer:
            checkpoint.write_atomic(state, path)
            checkpoint.link_atomic(path, self.last)
            self._prune()
        self._saved_step = state["step"]
        return path

    def improved(self, metrics: dict[str, float], best: dict | None) -> bool:
        """Whether ``metrics`` beat ``best`` (``{"metric", "value", "step"}`` or None)."""
        if self.best_metric is None:
            return False
        value = metrics[self.best_metric]
        if not math.isfinite(value):
            return False
        if best is None or best.get("metric") != self.best_metric:
            return True
        if self.best_metric in HIGHER_IS_BETTER:
            return value > best["value"]
        return value < best["value"]

    def save_best(self, state: Callable[[], dict[str, Any]], step: int) -> Path:
        """Make ``best.pt`` the state at ``step``: a link to the step file this process just
        saved for ``step``, else a new write of ``state()``."""
        target = self.directory / BEST
        if self.writer:
            source = self.step_path(step)
            if self._saved_step == step and source.is_file():
                checkpoint.link_atomic(source, target)
            else:
                checkpoint.write_atomic(state(), target)
        return target

    def step_files(self) -> list[Path]:
        return step_files(self.directory)

    def _prune(self) -> None:
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
            log.debug("removed %s (trainer.keep_last=%d)", old, self.keep_last)
