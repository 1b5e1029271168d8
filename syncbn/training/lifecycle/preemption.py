"""Stop requests: SIGTERM and SIGUSR1 ask the run to checkpoint and exit at the next sync.

SLURM sends SIGTERM before a time limit or a preemption (and ``sbatch --signal=USR1@90`` sends
SIGUSR1 ahead of it); torchrun's agent forwards the signals it handles to its workers. A signal
only sets a flag here; it is the training loop that acts on it, at its next sync point (every
``trainer.sync_every`` steps, :mod:`syncbn.training.steplog`) and on all ranks at once: each
rank's flag rides as one more value in the all-reduce of the steps' losses that the sync does
anyway, so the ranks agree on "someone was asked to stop" with no extra collective and no extra
host sync. The loop then writes a checkpoint, flushes W&B and exits with 75
(``exit_codes.PREEMPTED``). Worst case, that is ``sync_every`` steps after the signal.
"""

from __future__ import annotations

import logging
import signal
import threading

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
