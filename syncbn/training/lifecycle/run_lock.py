"""One job per run directory: a lock file naming its holder, safe on shared filesystems.

Two jobs launched into one run directory used to clobber each other silently: the second resumed
from the first's mid-run checkpoint while the first trained on, both wrote the same step files,
train.log and metrics. Now the first process (rank 0) creates ``run_dir/run.lock`` with
``O_CREAT | O_EXCL``, atomic on local filesystems and on NFS (v3 and later) and Lustre, where
``flock`` may be local to a node or not implemented. The file holds the holder's host, pid and
job id (``SLURM_JOB_ID``, else torchrun's ``TORCHELASTIC_RUN_ID``); a daemon thread touches it
every ``heartbeat_s`` seconds (the heartbeat is the file's mtime). The lock is stale, and taken
over with a warning, when

- its job id is this process's: a requeued SLURM job (same id), or torchrun restarting its
  workers, takes over its own lock;
- its host is this host and its pid is gone (a killed run, on one machine);
- its heartbeat is older than ``stale_s`` seconds (a holder on another node that died: its pid
  cannot be checked from here). Clocks: the mtime is set by the file server, compared with this
  node's clock; keep ``stale_s`` well above the skew.

Taking over renames the stale file to a name of this process (atomic: of several takers one
rename succeeds) and checks that the renamed file is the one judged stale before creating the
new lock; a holder that refreshed it in between gets it back. The lock is removed when the run
ends; a hard kill leaves it to the rules above.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import RunDirLocked
from .orphan import process_alive

log = logging.getLogger(__name__)

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # 20 heartbeats: a holder this quiet is dead (or its filesystem is)


def job_id_from_env() -> str | None:
    """This job's id: SLURM's (kept across requeues), else torchrun's run id (kept across its
    worker restarts), else None."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or None


class RunLock:
    """The lock of one run directory (a context manager: acquire, heartbeat, release).

    Args:
        run_dir: the run directory.
        job_id: this job's id (:func:`job_id_from_env`); a lock of the same id is taken over.
        heartbeat_s: how often the holder touches the lock. Default: 30.
        stale_s: a lock not touched for this long is taken over. Default: 600.
    """

    def __init__(self, run_dir: Path, job_id: str | None = None, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):  # fmt: skip
        self.path = Path(run_dir) / LOCK
        self.job_id = job_id
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id,
                       "started": time.time()}  # fmt: skip
        self._content = json.dumps(self.record)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirLocked` naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="syncbn-run-lock",
                                                daemon=True)  # fmt: skip
                self._thread.start()
                return
            content, age = _read(self.path)
            if content is None and age is None:
                continue  # released meanwhile: try again
            reason = self._stale(content, age)
            if reason is None:
                raise RunDirLocked(self._refusal(content, age))
            if self._take_over(content):
                log.warning("run directory %s: taking over the lock of %s: %s",
                            self.path.parent, _describe(content), reason)  # fmt: skip
        content, age = _read(self.path)
        raise RunDirLocked(self._refusal(content, age))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if _read(self.path)[0] == self._content:  # still ours
                self.path.unlink(missing_ok=True)

    def held_by_another(self) -> bool:
        """Whether another live job holds the run directory now (its status is its own)."""
        content, age = _read(self.path)
        if content is None:
            return False
        return self._stale(content, age or 0.0) is None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._content)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _stale(self, content: str | None, age: float) -> str | None:
        """Why the lock with ``content``, last touched ``age`` s ago, is stale; None if live."""
        holder = _parse(content)
        if self.job_id and holder.get("job_id") == self.job_id:
            return f"it is the same job ({self.job_id}), relaunched"
        if holder.get("host") == self.record["host"] and not process_alive(holder.get("pid")):
            return f"pid {holder.get('pid')} is gone"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_s:.0f} s)"
        return None

    def _take_over(self, content: str | None) -> bool:
        """Move the stale lock aside; True when it was the one judged stale (then the next
        create may win), False when someone else got there first."""
        aside = self.path.with_name(f".{LOCK}.{self.record['host']}.{os.getpid()}."
                                    f"{threading.get_ident()}.stale")  # fmt: skip
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another taker moved it
        if _read(aside)[0] != content:  # not the file we judged: a new holder's; give it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _refusal(self, content: str | None, age: float | None) -> str:
        beat = "" if age is None else f", last heartbeat {age:.0f} s ago"
        return (
            f"run directory {self.path.parent} is in use: its lock {self.path} is held by "
            f"{_describe(content)}{beat}; expected no other job training there. Wait for that "
            f"job to end, choose another hydra.run.dir, or, if it is certainly dead, delete "
            f"{self.path} (a lock is taken over by itself after {self.stale_s:.0f} s without a "
            f"heartbeat, at once when its pid is gone on the same host)"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                content = _read(self.path)[0]
                if content != self._content:
                    log.error("run directory %s: lost its lock %s (now held by %s)",
                              self.path.parent, self.path, _describe(content))  # fmt: skip
                    return
                os.utime(self.path)
            except OSError as error:  # a filesystem hiccup: try again next beat
                log.warning("run lock heartbeat failed: %s", error)


def _read(path: Path) -> tuple[str | None, float | None]:
    """The lock file's content and age in seconds; (None, None) when it does not exist."""
    try:
        with open(path) as f:
            content = f.read()
            age = time.time() - os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, None
    return content, age


def _parse(content: str | None) -> dict:
    try:
        holder = json.loads(content or "")
    except ValueError:  # being written, or not ours: only the heartbeat rule applies
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(content: str | None) -> str:
    holder = _parse(content)
    if not holder:
        return "an unknown holder (an unreadable lock file)"
    job = f" (job {holder['job_id']})" if holder.get("job_id") else ""
    return f"{holder.get('host')} pid {holder.get('pid')}{job}"
