"""Checkpoint files: atomic writes, loads with a clear error, and safe cleanup of temp files.

A write goes to a temp file named after its writer (``.<target>.<host>.<pid>.<random>.tmp``),
is fsynced, then ``os.replace``d over the target: a crash mid-write leaves the previous file
intact. Temp files left by a killed writer are removed by the next write, but only when their
writer is provably gone (same host, pid no longer alive): two writers in one directory (say an
orphaned worker and a relaunched one) never delete each other's temp file mid-write.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..lifecycle.orphan import process_alive

LAST = "last.pt"
REQUIRED = ("model", "optimizer", "epoch", "step")
_UMASK = os.umask(0o022)  # read it (only by setting it), at import, before any threads
os.umask(_UMASK)


def write_atomic(state: dict[str, Any], target: Path) -> Path:
    """``torch.save(state)`` to ``target`` atomically: temp file, fsync, ``os.replace``.

    ``state`` holds only tensors and plain containers, so it loads with
    ``torch.load(weights_only=True)``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target.parent)

    def fill(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions

    return _replace_through_temp(target, fill)


def link_atomic(source: Path, target: Path) -> Path:
    """Make ``target`` the same file as ``source`` atomically (a hard link; a copy if links fail).

    A hard link costs no second write of the checkpoint; ``source`` can be deleted later and
    ``target`` keeps the data.
    """

    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links: copy
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())

    return _replace_through_temp(target, fill)


def _replace_through_temp(target: Path, fill) -> Path:
    """Make ``target`` atomically: ``fill(fd, path)`` a temp file of this writer beside it, then
    ``os.replace`` it onto ``target`` and fsync the directory. A failure removes the temp file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_temp_prefix(target), suffix=".tmp")
    try:
        fill(fd, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temp files whose writer is dead (same host, pid gone); returns what it deleted.

    Temp files of live writers, of writers on other hosts (a shared filesystem: we cannot tell
    whether they live) and files not named by :func:`write_atomic` are left alone.
    """
    removed = []
    host = _host()
    for path in directory.glob(".*.tmp"):
        owner = _owner(path.name)
        if owner is None or owner[0] != host or process_alive(owner[1]):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def load(path: Path, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint this package wrote; anything else gets an error that says so."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise RuntimeError(
            f"checkpoint {path} is corrupted or not a syncbn training checkpoint ({error}); "
            f"delete it or point trainer.resume at another file"
        ) from error
    missing = set(REQUIRED) - set(state if isinstance(state, dict) else ())
    if missing:
        raise RuntimeError(
            f"checkpoint {path} expected keys {', '.join(REQUIRED)} (missing "
            f"{sorted(missing)}); it was not written by syncbn's train.py"
        )
    return state


def check_fits(path: Path, model: torch.nn.Module, saved: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the keys when the checkpoint's model tensors do not
    fit ``model`` (built from the current config): missing, unexpected, or of another shape."""
    mine = model.state_dict()
    problems = [
        f"{k}: checkpoint {list(v.shape)}, model {list(mine[k].shape)}"
        for k, v in saved.items()
        if k in mine and isinstance(v, torch.Tensor) and v.shape != mine[k].shape
    ]
    missing = sorted(set(mine) - set(saved))
    unexpected = sorted(set(saved) - set(mine))
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected[:5])}")
    if problems:
        raise ConfigError(
            f"checkpoint {path} expected tensors that fit the model this config builds (got "
            f"{'; '.join(problems[:5])}): the data (channels, classes) or the model differ "
            f"from the run that wrote it; use that run's data and model settings"
        )


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


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_host()}.{os.getpid()}."


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) from ``.<target>.<host>.<pid>.<random>.tmp``; None for other names."""
    parts = name.split(".")
    if len(parts) < 6 or not parts[-3].isdigit():
        return None
    return parts[-4], int(parts[-3])


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
