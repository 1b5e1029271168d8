"""Preemption and orphans under real torchrun launches (2 CPU ranks): a signal to the agent or to
one worker, or a SIGKILLed agent, ends in a checkpoint of the current step and exit code 75, and
the relaunch ends exactly where an uninterrupted run ends. (The SLURM script: test_faults.py.)"""

from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest

from syncbn.training.state import checkpoint
from tests.support.launch import (
    ROOT,
    Launch,
    alive,
    children,
    command,
    env,
    reference_run,
    status,
    wait_for,
)

pytestmark = pytest.mark.slow

JOB = ["trainer.epochs=4", "trainer.batch_size=32", "norm=syncbn", "seed=5"]  # 88 steps
EARLY_CHECKPOINT = ["trainer.ckpt_every_steps=5"]  # a first checkpoint to wait for, early


@pytest.fixture
def uninterrupted(tmp_path_factory):
    return reference_run(tmp_path_factory, *JOB, nproc=2)  # shared with test_faults.py


def _start(run_dir, *extra: str, launcher: tuple = ()) -> Launch:
    launcher = launcher or ("--standalone", "--nproc_per_node=2")
    return Launch(command(run_dir, *JOB, *EARLY_CHECKPOINT, *extra, launcher=launcher))


def _wait_for_checkpoint(run_dir, launch: Launch) -> None:
    last = run_dir / "checkpoints" / checkpoint.LAST
    wait_for(last.exists, "the first checkpoint", launch=launch)


def _assert_preempted(run_dir) -> dict:
    """status.json says 75 and last.pt is the checkpoint of the step the run stopped at."""
    record = status(run_dir)
    assert record["state"] == "preempted" and record["exit_code"] == 75, record
    assert 5 <= record["step"] < 88, record
    saved = checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)
    assert (saved["step"], saved["samples"]) == (record["step"], record["samples"])
    assert not (run_dir / "metrics.json").exists()
    return record


def _resume_and_compare(run_dir, uninterrupted: dict, record: dict) -> None:
    relaunch = Launch(command(run_dir, *JOB, nproc=2))
    assert relaunch.wait() == 0, relaunch.output[-4000:]
    assert f"at epoch {record['epoch']}, step {record['step']}" in relaunch.output
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["train_loss_history"] == uninterrupted["train_loss_history"]
    assert resumed["val_acc"] == uninterrupted["val_acc"]


def test_sigterm_to_the_agent_checkpoints_flushes_wandb_exits_75_and_resumes(
    tmp_path, uninterrupted
):
    """What SLURM does at a time limit: SIGTERM to torchrun, which forwards it to the workers."""
    run_dir = tmp_path / "run"
    agent = _start(run_dir, "logger.mode=offline", "trainer.log_every=1")
    _wait_for_checkpoint(run_dir, agent)
    agent.process.send_signal(signal.SIGTERM)
    agent.wait()
    assert agent.output.count("got SIGTERM: checkpointing and exiting") == 2, agent.output[-4000:]
    assert "exitcode  : 75" not in agent.output  # torchrun was signalled: no failure summary
    record = _assert_preempted(run_dir)
    (records,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    content = records.read_bytes()  # flushed: every step up to the preemption is in it
    assert b"train/loss" in content and len(content) > 4000, len(content)
    _resume_and_compare(run_dir, uninterrupted, record)


def test_sigusr1_to_one_worker_stops_both_at_one_step_and_torchrun_restarts_them(
    tmp_path, uninterrupted
):
    """Only rank 1 gets the signal; the flag rides in the loss all-reduce, so rank 0 stops at
    the same step. With --max-restarts torchrun restarts both, and they resume."""
    run_dir = tmp_path / "run"
    agent = _start(run_dir, launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"))
    _wait_for_checkpoint(run_dir, agent)
    rank0, rank1 = sorted(children(agent.process.pid))
    os.kill(rank1, signal.SIGUSR1)
    assert agent.wait() == 0, agent.output[-4000:]
    output = agent.output
    assert output.count("got SIGUSR1: checkpointing") == 1, output[-4000:]  # rank 1 only
    assert "preempted at step" in output and "attempt 2 of this torchrun job" in output
    step = int(output.split("preempted at step ")[1].split()[0])
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at epoch" in output
    assert f", step {step}, sample {step * 64}" in output
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["train_loss_history"] == uninterrupted["train_loss_history"]


def test_workers_of_a_sigkilled_agent_checkpoint_and_exit(tmp_path):
    """SIGKILL of torchrun used to leave its workers training to the end (and racing the
    relaunch for the run directory). Now they notice their parent is gone, stop at a step
    boundary with a checkpoint and exit 75. (The relaunch from such a checkpoint: the SIGTERM
    test above; two writers in one directory: test_checkpoints.py.)"""
    run_dir = tmp_path / "run"
    agent = _start(run_dir)
    _wait_for_checkpoint(run_dir, agent)
    workers = children(agent.process.pid)
    assert len(workers) == 2, workers
    agent.process.send_signal(signal.SIGKILL)
    agent.wait()
    wait_for(lambda: not any(alive(w) for w in workers), "the orphaned workers to exit", 60)
    output = agent.output  # the workers wrote to the agent's pipe until they exited
    # The first watcher to notice (0.25 s polls) stops both ranks through the agreed stop, often
    # before the other rank's watcher looks again.
    assert "is gone: checkpointing and exiting" in output, output[-4000:]
    _assert_preempted(run_dir)


HOLD_AT_START_UP = textwrap.dedent(
    """
    import os
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        import time
        from pathlib import Path
        import syncbn.training.loop as loop

        build = loop.build

        def build_when_released(cfg, env):  # start-up, before the first step
            Path(os.environ["HOLD_DIR"], os.environ["RANK"]).touch()
            release = Path(os.environ["HOLD_DIR"], "release")
            while not release.exists():
                time.sleep(0.05)
            return build(cfg, env)

        loop.build = build_when_released
    """
)


def test_a_signal_during_start_up_ends_in_status_75(tmp_path):
    """Issue 26: a SIGTERM before the training loop started killed the workers outright (-15):
    no message, no status.json, so nothing requeued. Now the handlers are installed first thing
    and the ranks agree on the stop before the first step."""
    hold = tmp_path / "hold"
    hold.mkdir()
    (tmp_path / "sitecustomize.py").write_text(HOLD_AT_START_UP)
    environment = env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", HOLD_DIR=str(hold))
    run_dir = tmp_path / "run"
    agent = Launch(command(run_dir, "trainer.max_steps=4", nproc=2), environment)
    wait_for(lambda: len(list(hold.iterdir())) == 2, "both ranks in start-up", launch=agent)
    agent.process.send_signal(signal.SIGTERM)
    wait_for(lambda: agent.output.count("got SIGTERM") == 2, "both ranks' handlers", 60,
             launch=agent)  # fmt: skip
    (hold / "release").touch()
    agent.wait(timeout=120)
    record = status(run_dir)
    assert record is not None, agent.output[-4000:]
    assert (record["exit_code"], record["step"], record["checkpoint"]) == (75, 0, None), record
    assert "preempted before the first step" in agent.output
