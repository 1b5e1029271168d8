"""Which checkpoint a launch resumes from, and when it may start from scratch.

``trainer.resume=auto`` tries ``run_dir/checkpoints/last.pt``, then the step files
(``step-*.pt``), newest first, and resumes from the first that loads, saying which and why
(last.pt missing, or a file that does not load: truncated by a full disk, a killed copy...).
A run directory that holds checkpoints is never restarted from scratch silently: when none of
them loads (``auto``), or with ``trainer.resume=null``, the launch stops with a
:class:`~syncbn.training.errors.ConfigError` naming the files, unless ``trainer.overwrite=true``;
then the old checkpoints are moved aside to ``run_dir/checkpoints-replaced-<time>/`` (not
deleted: a fresh run's step files would otherwise be pruned in favour of the old run's higher
step numbers, and nothing the user paid for is lost).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import checkpoint
from .manager import BEST, step_files

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class Resumable:
    """The checkpoint a launch resumes from: its path, its loaded state, and, when it is not
    the one asked for (``last.pt``), why (``note``, also logged)."""

    path: Path
    saved: dict[str, Any]
    note: str | None = None


def choose(resume: str | None, run_dir: Path, overwrite: bool, map_location="cpu",
           writer: bool = False) -> Resumable | None:  # fmt: skip
    """The checkpoint ``trainer.resume`` asks for, or None to start fresh.

    Args:
        resume: ``trainer.resume``: ``"auto"``, None/``""`` (start fresh) or a checkpoint path.
        run_dir: the run directory (its ``checkpoints/`` is searched and protected).
        overwrite: ``trainer.overwrite``: whether checkpoints that will not be resumed may be
            moved aside for a fresh start.
        writer: whether this process moves them (rank 0); the others only decide.
    """
    if resume and resume != "auto":  # an explicit file: the user chose
        path = Path(resume)
        return Resumable(path, checkpoint.load(path, map_location=map_location))
    directory = run_dir / CHECKPOINTS
    existing = _candidates(directory)
    protected = existing + [p for p in (directory / BEST,) if p.is_file()]
    if not resume:
        if protected:
            _start_over(directory, protected, overwrite, writer, _fresh_refused(protected))
        return None
    failures: list[str] = []
    last = directory / checkpoint.LAST
    if existing and existing[0] != last:
        failures.append(f"{last} is missing")
    for path in existing:
        try:
            saved = checkpoint.load(path, map_location=map_location)
        except RuntimeError as error:
            failures.append(f"{path.name} does not load ({_short(error)})")
            continue
        note = None
        if failures:
            note = f"{'; '.join(failures)}: resuming from {path} (step {saved['step']})"
            if writer:  # said once, by rank 0
                log.warning(note)
        return Resumable(path, saved, note)
    if protected:
        _start_over(directory, protected, overwrite, writer, _none_loads(directory, failures))
    return None


def _candidates(directory: Path) -> list[Path]:
    """last.pt, then the step files newest first: the order a resume tries them in."""
    last = directory / checkpoint.LAST
    return [p for p in (last,) if p.is_file()] + step_files(directory)[::-1]


def _start_over(directory: Path, protected: list[Path], overwrite: bool, writer: bool,
                refusal: str) -> None:  # fmt: skip
    if not overwrite:
        raise ConfigError(refusal)
    aside = directory.with_name(f"{CHECKPOINTS}-replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    if writer:
        directory.rename(aside)
        log.warning("trainer.overwrite=true: starting from scratch; the %d checkpoint files of "
                    "%s were moved to %s", len(protected), directory, aside)  # fmt: skip


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths)


def _fresh_refused(protected: list[Path]) -> str:
    return (
        f"trainer.resume=null expected a run directory without checkpoints (got "
        f"{protected[0].parent} holding {_names(protected)}, which a fresh start would "
        f"overwrite and prune); resume with trainer.resume=auto, choose another hydra.run.dir, "
        f"or pass trainer.overwrite=true to start over (they are moved to "
        f"{CHECKPOINTS}-replaced-<time>/)"
    )


def _none_loads(directory: Path, failures: list[str]) -> str:
    return (
        f"trainer.resume=auto expected a checkpoint that loads in {directory} (got: "
        f"{'; '.join(failures)}); point trainer.resume at a good file, or pass "
        f"trainer.overwrite=true to start over (they are moved to "
        f"{CHECKPOINTS}-replaced-<time>/)"
    )


def _short(error: Exception) -> str:
    text = str(error.__cause__ or error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
