"""Workers end themselves when their torchrun agent dies (no orphans training on).

When the agent is SIGKILLed (an OOM killer, a node agent, ``kill -9``) nobody forwards a signal
to its workers, and they used to train to the end, then race a relaunched job for the same run
directory. :func:`watch_parent` starts a daemon thread that polls the parent pid (a
``getppid()`` system call every ``poll_s``; the parent of a torchrun worker is its agent). Once
the parent is gone it sends this process SIGTERM, which the training loop treats like a
preemption (all ranks stop at the next sync, checkpoint, exit 75); if the process is
still alive ``grace_s`` later (a peer died too and a collective hangs), it exits hard with
:data:`ORPHANED`.

Polling rather than ``prctl(PR_SET_PDEATHSIG)``: the kernel sends the death signal when the
*thread* that forked the worker exits, not the process, and it offers no grace period; the
poll costs one system call every quarter second on a side thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

ORPHANED = 1  # a hard exit: no checkpoint was written


def under_torchrun() -> bool:
    """Whether this process is a worker that torchrun's elastic agent started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_parent(grace_s: float, poll_s: float = 0.25) -> threading.Thread:
    """Watch the parent process; when it dies: SIGTERM to self, then a hard exit after grace_s."""
    parent = os.getppid()
    if parent == 1:  # adopted by init already: the agent died before we got here
        parent = -1  # so the watch fires at once
    thread = threading.Thread(
        target=_watch, args=(parent, grace_s, poll_s), name="syncbn-orphan-watch", daemon=True
    )
    thread.start()
    return thread


def _watch(parent: int, grace_s: float, poll_s: float) -> None:
    stop = threading.Event()
    while os.getppid() == parent:
        stop.wait(poll_s)
    log.warning(
        "the launcher (pid %d) is gone: checkpointing and exiting (hard exit in %.0f s)",
        parent,
        grace_s,
    )
    os.kill(os.getpid(), signal.SIGTERM)
    stop.wait(grace_s)
    log.error("still running %.0f s after the launcher died: exiting hard", grace_s)
    logging.shutdown()
    os._exit(ORPHANED)


def process_alive(pid) -> bool:
    """Whether a process of this id runs on this host (another user's counts); a missing or
    non-positive id (from an unreadable record) is not one."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
