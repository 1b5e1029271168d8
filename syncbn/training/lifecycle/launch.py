"""A launcher between a scheduler and torchrun: stop signals become torchrun's graceful stop, and
it exits only when the workers are done, with train.py's own exit code.

::

    python -m syncbn.training.lifecycle.launch --run-dir R -- torchrun ... train.py hydra.run.dir=R

torchrun has no handler for SIGUSR1: one dies at once (rc -10) while its workers checkpoint and
write status 75 a moment later, so a wrapper that reads ``status.json`` when torchrun returns sees
"running", and under srun the step may be torn down before the workers finish. This launcher

- starts the command with SIGUSR1 *ignored* (inherited through exec; torchrun installs no
  handler of its own, train.py installs its own first thing), so a SIGUSR1 sent to every
  process of a job (``scancel --signal=USR1``) leaves torchrun alone and reaches the workers;
- answers SIGUSR1, SIGTERM and SIGINT by sending SIGTERM to the command, once: torchrun forwards
  it to its workers and waits for them (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) instead of
  restarting them (a second SIGTERM to torchrun would cut that wait short: signal either the
  launcher or torchrun with TERM, not both);
- is a child subreaper (Linux), so workers orphaned by a torchrun that died anyway become its
  children and are waited for, up to ``--grace`` seconds;
- then waits (same deadline) for ``R/status.json`` to leave "running" and exits with its
  ``exit_code`` (75: requeue) when this launch wrote it, else with the command's code.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = time.time()
    _become_subreaper()
    child = subprocess.Popen(args.command, preexec_fn=_ignore_usr1)
    forwarded: list[int] = []

    def forward(signum, frame) -> None:
        if not forwarded:
            forwarded.append(signum)
            _say(f"got {signal.Signals(signum).name}: SIGTERM to {args.command[0]} "
                 f"(pid {child.pid}), waiting for the workers")  # fmt: skip
            _kill(child.pid, signal.SIGTERM)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = child.wait()
    deadline = time.monotonic() + args.grace
    _reap_orphans(deadline)
    record = _final_status(args.run_dir, started, deadline) if args.run_dir else None
    if record is not None:
        return int(record["exit_code"])
    return code if code >= 0 else 128 - code


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m syncbn.training.lifecycle.launch",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--run-dir", type=Path, help="train.py's run directory (status.json)")
    parser.add_argument("--grace", type=float, default=120.0,
                        help="seconds to wait for orphaned workers and a final status.json "
                        "after the command ends (default: 120)")  # fmt: skip
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- torchrun ... train.py ...")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("expected a command after -- (got none), e.g. -- torchrun ... train.py")
    return args


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def _become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans go to init, status.json still waited
        pass


def _reap_orphans(deadline: float) -> None:
    """Wait for the processes reparented to us (workers of a dead torchrun) until ``deadline``."""
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:
            time.sleep(0.05)


def _final_status(run_dir: Path, started: float, deadline: float) -> dict | None:
    """status.json once it is final and written by this launch; None if it is not by
    ``deadline`` (or was left by an earlier launch)."""
    while True:
        try:
            record = json.loads((run_dir / "status.json").read_text())
        except (OSError, ValueError):
            record = None
        if record is None or record.get("time", 0) < started - 5:  # none of ours (clock skew)
            return None
        if record.get("exit_code") is not None:
            return record
        if time.monotonic() >= deadline:
            _say(f"{run_dir / 'status.json'} still says running; using the command's code")
            return None
        time.sleep(0.1)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _say(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
