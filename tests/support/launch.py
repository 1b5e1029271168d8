"""Launching train.py for real in tests: torchrun or a single process, and waiting on what it does.

Tests wait on observable events (a file appearing, a line in the output, a process ending), never
on fixed sleeps: :func:`wait_for` polls a condition with a generous deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["trainer.progress=false", "logger.mode=disabled"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def env(**extra: str) -> dict:
    """The environment of a launched run: one thread per rank, W&B quiet, this checkout first."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    environment.pop("WANDB_MODE", None)  # the config's logger.mode decides
    return environment | extra


def command(run_dir: Path, *overrides: str, nproc: int = 1, launcher: tuple = ()) -> list[str]:
    """train.py under torchrun (``nproc > 1`` or a ``launcher``), else as a single process."""
    prefix = [sys.executable]
    if nproc > 1 or launcher:
        prefix = [*TORCHRUN, *(launcher or ("--standalone", f"--nproc_per_node={nproc}"))]
    return [*prefix, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUIET, *overrides]


def train(run_dir: Path, *overrides: str, nproc: int = 1, timeout: float = 180) -> dict:
    """Run train.py to the end (exit 0 expected) and return its metrics.json."""
    cmd = command(run_dir, *overrides, nproc=nproc)
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads((run_dir / "metrics.json").read_text())


class Launch:
    """A train.py launch in the background whose combined output is collected as it comes."""

    def __init__(self, cmd: list[str], environment: dict | None = None):
        self.cmd = cmd
        self.process = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=environment or env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() when each line arrived
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.times.append(time.monotonic())
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float = 180) -> int:
        try:
            code = self.process.wait(timeout=timeout)
            self.ended = time.monotonic()
        except subprocess.TimeoutExpired:
            self.kill()
            message = f"{' '.join(self.cmd)} did not end:\n{self.output[-4000:]}"
            raise AssertionError(message) from None
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """SIGKILL the launch and whatever it started (workers included)."""
        for pid in descendants(self.process.pid):
            _signal(pid, signal.SIGKILL)
        _signal(self.process.pid, signal.SIGKILL)
        self.process.wait()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 120,
             launch: Launch | None = None) -> object:  # fmt: skip
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the deadline
    (or as soon as ``launch`` ends without it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        ended = launch is not None and launch.process.poll() is not None
        if ended or time.monotonic() > deadline:
            output = launch.output[-4000:] if launch else ""
            reason = "the launch ended" if ended else f"{timeout} s passed"
            raise AssertionError(f"waiting for {what}: {reason} first\n{output}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def status(run_dir: Path) -> dict | None:
    """The run's status.json (rank 0 writes it), or None before there is one."""
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


_REFERENCES: dict[tuple, dict] = {}


def reference_run(tmp_path_factory, *overrides: str, nproc: int = 2) -> dict:
    """An uninterrupted run's metrics, computed once per test session for each set of args."""
    key = (overrides, nproc)
    if key not in _REFERENCES:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        _REFERENCES[key] = train(run_dir, *overrides, nproc=nproc)
    return _REFERENCES[key]


PAUSE_AFTER_FIRST_CHECKPOINT = textwrap.dedent(
    """
    import os
    marker = os.environ.get("PAUSE_MARKER")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if marker and attempt == "0" and os.environ.get("RANK", "0") == os.environ["PAUSE_RANK"]:
        import threading
        from pathlib import Path
        import syncbn.training.loop as loop

        save = loop._checkpoint

        def save_then_pause(r):
            saved = save(r)
            Path(marker + ".tmp").write_text(f"{os.getpid()} {r.state.step}")
            os.replace(marker + ".tmp", marker)
            threading.Event().wait()  # mid-run, until the test kills this process
            return saved

        loop._checkpoint = save_then_pause
    """
)


def pausing_env(tmp_path: Path, rank: int = 0) -> tuple[dict, Path]:
    """An environment whose rank ``rank`` stops dead after its first checkpoint (the first
    torchrun attempt only) and says so in a marker file: a kill then lands mid-run, always."""
    (tmp_path / "sitecustomize.py").write_text(PAUSE_AFTER_FIRST_CHECKPOINT)
    marker = tmp_path / "paused"
    environment = env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", PAUSE_MARKER=str(marker),
                      PAUSE_RANK=str(rank))  # fmt: skip
    return environment, marker
