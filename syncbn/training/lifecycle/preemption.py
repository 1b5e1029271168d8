"""Stop requests: SIGTERM and SIGUSR1 ask the run to checkpoint and exit at the next sync.

SLURM sends SIGTERM before a time limit or a preemption (and ``sbatch --signal=USR1@90`` sends
SIGUSR1 ahead of it); torchrun's agent forwards the signals it handles to its workers. A signal
only sets a flag here; it is the training loop that acts on it, at its next sync point (every
``trainer.sync_every`` steps, :mod:`syncbn.training.steplog`) and on all ranks at once: each
rank's flag rides as one more value in the all-reduce of the steps' losses that the sync does
anyway, so the ranks agree on "someone was asked to stop" with no extra collective and no extra
host sync. The loop then writes a checkpoint, flushes W&B and exits with 75
(``exit_codes.PREEMPTED``). Worst case, that is ``sync_every`` steps after the signal.

A signal can arrive long before the loop starts (start-up takes seconds to minutes: imports,
data, a large resume, W&B). train.py therefore catches the signals from its first lines on
(standard library only) and hands what it caught to :func:`install`, which makes one
:class:`StopRequest` the process's for its whole life; the loop then agrees on a stop before its
first step too (:func:`syncbn.training.loop._fit`), so a job signalled during start-up still
exits 75 with a status file.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequest:
    """Catches :data:`STOP_SIGNALS` while active (a context manager) and remembers the first one.

    Handlers are installed only from the main thread (Python's rule) and restored on exit. A
    second signal changes nothing: the run is already stopping.
    """

    def __init__(self, signals: tuple[str, ...] = STOP_SIGNALS):
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            log.warning(
                "got %s: checkpointing and exiting at the next sync (trainer.sync_every steps "
                "at most)",
                signal.Signals(signum).name,
            )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


_installed: StopRequest | None = None


def install(caught: Iterable[int] = ()) -> StopRequest:
    """Make one :class:`StopRequest` catch the stop signals for the rest of this process.

    ``caught``: signals already caught before (train.py's first lines), remembered as received.
    """
    global _installed
    if _installed is None:
        _installed = StopRequest().__enter__()
    for signum in caught:
        _installed._handle(signum, None)
    return _installed


@contextlib.contextmanager
def stop_request() -> Iterator[StopRequest]:
    """The process's :class:`StopRequest` when :func:`install` made one (left installed), else
    a new one for the duration (library use: ``syncbn.training.run`` called from Python)."""
    if _installed is not None:
        yield _installed
        return
    with StopRequest() as stop:
        yield stop
