"""train.py's exit codes, so that a launcher can tell "resume me" from "fix me" (sysexits.h).

====  ==========================================================================================
0     finished
1     crashed: an exception (torchrun's failure summary shows the failing rank's traceback)
65    stopped on a non-finite loss (``trainer.nonfinite=stop``, or more than
      ``trainer.max_consecutive_skips`` in a row with ``skip``); the newest checkpoint is the
      last finite state
73    the run directory is in use: another job holds its lock (``run_dir/run.lock``, named in
      the message); nothing was written
75    preempted (SIGTERM or SIGUSR1, or the torchrun agent died): a checkpoint of the current
      step is written; launch again with ``trainer.resume=auto`` to continue (SLURM: requeue)
78    bad configuration: nothing ran
====  ==========================================================================================

torchrun does not pass its workers' exit codes on (it exits 1 whenever a worker fails or it is
signalled), so rank 0 also records the code in ``run_dir/status.json``; that is what
``scripts/slurm/train.sbatch`` reads to decide on a requeue.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OK = 0
CRASHED = 1
NONFINITE = 65  # EX_DATAERR
LOCKED = 73  # EX_CANTCREAT: the run directory is another job's
PREEMPTED = 75  # EX_TEMPFAIL: try again
CONFIG = 78  # EX_CONFIG

STATUS = "status.json"
_STATES = {OK: "finished", NONFINITE: "nonfinite", LOCKED: "locked", PREEMPTED: "preempted",
           CONFIG: "config"}  # fmt: skip


def write_status(run_dir: Path, exit_code: int | None, **details: Any) -> None:
    """Record in ``run_dir/status.json`` how the run stands (rank 0 calls it).

    ``exit_code=None`` while running; then the code train.py exits with. Written atomically, so a
    reader (the sbatch script) never sees half a file.
    """
    state = "running" if exit_code is None else _STATES.get(exit_code, "failed")
    record = {"state": state, "exit_code": exit_code, **details, "time": time.time()}
    tmp = run_dir / f".{STATUS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, run_dir / STATUS)


def write_config_error(run_dir, error: Exception) -> None:
    """``status.json`` of a run refused for its configuration (exit 78), with the message; a
    directory that cannot be written is reported, not raised (the config error is the news)."""
    try:
        path = Path(str(run_dir)).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        write_status(path, CONFIG, error=str(error))
    except Exception as problem:  # noqa: BLE001 - a bad run_dir must not hide the config error
        log.warning("could not record the configuration error in %s/%s (%s)", run_dir, STATUS,
                    problem)  # fmt: skip
