"""Atomic, ``weights_only``-loadable checkpoints of the full training state."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"


def save(state: dict[str, Any], directory: Path) -> Path:
    """Write ``state`` to ``directory/last.pt`` atomically: a temp file, fsync, ``os.replace``.

    A crash mid-write leaves the previous checkpoint intact; the next save removes the temp file
    a killed writer left behind (one writer per directory: rank 0). ``state`` holds only tensors
    and plain containers, so it loads with ``torch.load(weights_only=True)``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / LAST
    for stale in directory.glob(".last-*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".last-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load(path: Path, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint this module wrote; anything else gets an error that says so."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise RuntimeError(
            f"checkpoint {path} is corrupted or not a syncbn training checkpoint ({error}); "
            f"delete it or point trainer.resume at another file"
        ) from error
    missing = {"model", "optimizer", "epoch", "step"} - set(
        state if isinstance(state, dict) else ()
    )
    if missing:
        raise RuntimeError(
            f"checkpoint {path} expected keys model, optimizer, epoch, step (missing "
            f"{sorted(missing)}); it was not written by syncbn's train.py"
        )
    return state


def resolve(resume: str | None, run_dir: Path) -> Path | None:
    """``trainer.resume``: None/'' -> start fresh; 'auto' -> the run's last checkpoint if any."""
    if not resume:
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(
            f"trainer.resume expected a checkpoint file or 'auto' (got {resume!r})"
        )
    return path
