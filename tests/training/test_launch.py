"""The launcher between a scheduler and torchrun (syncbn.training.lifecycle.launch), against a
stand-in for torchrun that dies on SIGUSR1 at once as torchrun does, and a worker that takes a
moment to checkpoint and write status 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.support.launch import children, descendants, wait_for

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    run_dir = Path(sys.argv[1])
    def status(code):
        tmp = run_dir / ".status.tmp"
        tmp.write_text(json.dumps({"exit_code": code, "time": time.time()}))
        os.replace(tmp, run_dir / "status.json")
    stop = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda s, f: stop.append(s))
    status(None)
    (run_dir / "ready").touch()
    while not stop:
        time.sleep(0.01)
    time.sleep(0.7)  # the checkpoint
    status(75)
    sys.exit(75)
    """
)
# torchrun: handles TERM (forwards it, waits for the worker, exits 1), not USR1 (dies at once).
AGENT = textwrap.dedent(
    """
    import signal, subprocess, sys
    worker = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])
    signal.signal(signal.SIGTERM, lambda s, f: worker.send_signal(signal.SIGTERM))
    sys.exit(1 if worker.wait() else 0)
    """
)


@pytest.fixture
def job(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "agent.py").write_text(AGENT)
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def start(*launcher: str) -> subprocess.Popen:
        agent = [sys.executable, str(tmp_path / "agent.py"), str(tmp_path / "worker.py"),
                 str(run_dir)]  # fmt: skip
        process = subprocess.Popen([*launcher, *agent])
        wait_for((run_dir / "ready").exists, "the worker")
        return process

    return start, run_dir


LAUNCH = [sys.executable, "-m", "syncbn.training.lifecycle.launch", "--grace=30"]


def _status(run_dir):
    return json.loads((run_dir / "status.json").read_text())["exit_code"]


def test_without_the_launcher_usr1_kills_the_agent_before_the_workers_are_done(job):
    """The bug the launcher is for (issue 26): rc -10 while status.json still says running."""
    start, run_dir = job
    agent = start()
    for pid in [agent.pid, *children(agent.pid)]:  # the agent and its worker, like a group kill
        os.kill(pid, signal.SIGUSR1)
    assert agent.wait(timeout=30) == -signal.SIGUSR1
    assert _status(run_dir) is None
    wait_for(lambda: _status(run_dir) == 75, "the orphaned worker", 30)


@pytest.mark.parametrize("target", ["launcher", "every process"])
def test_usr1_ends_the_launcher_with_the_workers_status(job, target):
    start, run_dir = job
    launcher = start(*LAUNCH, f"--run-dir={run_dir}", "--")
    pids = [launcher.pid] + (descendants(launcher.pid) if target == "every process" else [])
    started = time.monotonic()
    for pid in pids:  # "every process": scancel --signal=USR1, the agent included
        os.kill(pid, signal.SIGUSR1)
    assert launcher.wait(timeout=60) == 75
    assert _status(run_dir) == 75  # final when the launcher returned
    assert time.monotonic() - started >= 0.7
    assert not descendants(launcher.pid)


def test_the_command_code_when_there_is_no_status(tmp_path):
    done = subprocess.run([*LAUNCH, f"--run-dir={tmp_path}", "--", sys.executable, "-c",
                           "raise SystemExit(78)"], timeout=60)  # fmt: skip
    assert done.returncode == 78
