"""One job per run directory: an atomically created lock file naming its holder (host, pid, job
id) with a heartbeat; stale locks (dead pid on this host, no heartbeat, the same SLURM job
requeued) are taken over, live ones refused with an error naming the holder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from syncbn.training.errors import RunDirLocked
from syncbn.training.lifecycle import exit_codes
from syncbn.training.lifecycle.run_lock import LOCK, RunLock
from syncbn.training.state import checkpoint
from tests.support.launch import Launch, command, pausing_env, status, wait_for


def _foreign_lock(run_dir, host="other-node", pid=4321, job_id="111", age_s=0.0):
    path = run_dir / LOCK
    path.write_text(json.dumps({"host": host, "pid": pid, "job_id": job_id, "started": 0}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path, job_id="7"):
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["job_id"] == "7"
        with pytest.raises(RunDirLocked) as refused:
            RunLock(tmp_path, job_id="8").acquire()
        message = str(refused.value)
        assert f"{socket.gethostname()} pid {os.getpid()} (job 7)" in message
        assert str(tmp_path) in message and "another hydra.run.dir" in message
    assert not (tmp_path / LOCK).exists()  # released
    with RunLock(tmp_path, job_id="8"):  # free again
        pass


def test_a_live_holder_on_another_host_with_a_fresh_heartbeat_keeps_the_lock(tmp_path):
    _foreign_lock(tmp_path, age_s=10)
    with pytest.raises(RunDirLocked, match=r"held by other-node pid 4321 \(job 111\)"):
        RunLock(tmp_path, job_id="222", stale_s=60).acquire()


def test_a_lock_without_heartbeat_is_stale(tmp_path, caplog):
    _foreign_lock(tmp_path, age_s=120)
    with RunLock(tmp_path, job_id="222", stale_s=60):
        assert json.loads((tmp_path / LOCK).read_text())["job_id"] == "222"
    assert "no heartbeat for 120 s" in caplog.text


def test_a_lock_of_a_dead_process_on_this_host_is_stale(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lock(tmp_path, host=socket.gethostname(), pid=dead.pid)
    with RunLock(tmp_path, job_id="222"):
        pass
    assert f"pid {dead.pid} is gone" in caplog.text


def test_a_requeued_job_takes_over_its_own_lock(tmp_path, caplog):
    _foreign_lock(tmp_path, job_id="4242")
    with RunLock(tmp_path, job_id="4242"):
        pass
    assert "the same job (4242)" in caplog.text


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.05):
        path = tmp_path / LOCK
        old = time.time() - 100
        os.utime(path, (old, old))
        wait_for(lambda: path.stat().st_mtime > old + 50, "a heartbeat", 10)


def test_of_many_concurrent_takers_of_a_stale_lock_exactly_one_wins(tmp_path):
    _foreign_lock(tmp_path, age_s=120)

    def take(i):
        try:
            RunLock(tmp_path, job_id=f"j{i}", stale_s=60).acquire()
            return i
        except RunDirLocked:
            return None

    with ThreadPoolExecutor(8) as pool:
        winners = [i for i in pool.map(take, range(8)) if i is not None]
    assert len(winners) == 1, winners
    assert json.loads((tmp_path / LOCK).read_text())["job_id"] == f"j{winners[0]}"


@pytest.mark.slow
def test_a_second_job_in_a_running_jobs_directory_exits_with_an_error_naming_it(tmp_path):
    """Issue 26: the second job used to resume from the first's checkpoint and both trained on,
    writing the same files. Now every rank of the second exits 73 before touching anything."""
    run_dir = tmp_path / "run"
    environment, paused = pausing_env(tmp_path)
    args = ["trainer.batch_size=16", "trainer.ckpt_every_steps=2", "trainer.max_steps=12"]
    first = Launch(command(run_dir, *args, nproc=2), environment)
    try:
        wait_for(paused.exists, "the first job's first checkpoint", launch=first)
        second = Launch(command(run_dir, *args, "optim.lr=0.3", nproc=2))
        assert second.wait(timeout=120) != 0
        output = second.output
        assert output.count("is in use: its lock") == 2, output[-4000:]  # both ranks say it
        assert f"exitcode  : {exit_codes.LOCKED}" in output, output[-4000:]
        assert f"pid {first.process.pid}" not in output  # the holder is rank 0, not the agent
        holder = json.loads((run_dir / LOCK).read_text())
        assert f"held by {holder['host']} pid {holder['pid']}" in output
        assert status(run_dir)["state"] == "running"  # the first job's, untouched
        assert checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)["step"] == 2
    finally:
        first.kill()
    assert first.process.returncode == -signal.SIGKILL
