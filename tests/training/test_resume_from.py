"""Which checkpoint a launch resumes from: the newest one that loads (last.pt, then the step
files), saying which and why, and never a silent start from scratch in a run directory that holds
checkpoints (``trainer.overwrite``)."""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch

from syncbn.training.errors import ConfigError
from syncbn.training.state import checkpoint, resume_from
from syncbn.training.state.manager import CheckpointManager
from tests.support.launch import ROOT, command, env, train


def _run_dir(tmp_path, steps=(2, 4, 6)):
    """A run directory whose checkpoints/ holds step files for ``steps`` and last.pt."""
    ckpts = CheckpointManager(tmp_path / "checkpoints", keep_last=5, best_metric=None, writer=True)
    for step in steps:
        state = {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "epoch": 0,
                 "step": step}  # fmt: skip
        ckpts.save(state)
    return tmp_path, ckpts


def test_auto_resumes_from_last_pt(tmp_path):
    run_dir, ckpts = _run_dir(tmp_path)
    found = resume_from.choose("auto", run_dir, overwrite=False)
    assert found.path == ckpts.last and found.saved["step"] == 6 and found.note is None


def test_a_missing_last_pt_falls_back_to_the_newest_step_file_and_says_so(tmp_path, caplog):
    run_dir, ckpts = _run_dir(tmp_path)
    ckpts.last.unlink()
    with caplog.at_level(logging.WARNING):
        found = resume_from.choose("auto", run_dir, overwrite=False, writer=True)
    assert found.path == ckpts.step_path(6) and found.saved["step"] == 6
    assert f"{ckpts.last} is missing" in found.note and "step-00000006.pt" in found.note
    assert found.note in caplog.text


def test_a_truncated_last_pt_falls_back_to_the_newest_step_file_that_loads(tmp_path):
    run_dir, ckpts = _run_dir(tmp_path)
    size = ckpts.last.stat().st_size
    with open(ckpts.last, "r+b") as f:  # last.pt is step-6's inode: both are truncated
        f.truncate(size // 2)
    found = resume_from.choose("auto", run_dir, overwrite=False)
    assert found.path == ckpts.step_path(4) and found.saved["step"] == 4
    assert "last.pt does not load" in found.note and "step-00000006.pt does not load" in found.note


def test_checkpoints_that_do_not_load_are_never_silently_replaced(tmp_path):
    run_dir, ckpts = _run_dir(tmp_path, steps=(2,))
    ckpts.step_path(2).write_bytes(b"garbage")  # last.pt keeps the old inode: garbage it too
    ckpts.last.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"trainer.resume=auto expected a checkpoint that loads"
                       r".*last.pt.*step-00000002.pt.*trainer.overwrite=true"):  # fmt: skip
        resume_from.choose("auto", run_dir, overwrite=False)


def test_a_fresh_start_in_a_directory_with_checkpoints_needs_overwrite(tmp_path):
    run_dir, ckpts = _run_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.resume=null expected a run directory without "
                       r"checkpoints .*step-00000006.pt.*trainer.overwrite=true"):  # fmt: skip
        resume_from.choose(None, run_dir, overwrite=False)
    assert resume_from.choose(None, run_dir, overwrite=True, writer=True) is None
    (moved,) = run_dir.glob("checkpoints-replaced-*")  # moved aside, not deleted
    assert sorted(p.name for p in moved.iterdir()) == ["last.pt", *(
        f"step-0000000{s}.pt" for s in (2, 4, 6))]  # fmt: skip
    assert not ckpts.directory.exists()


def test_an_empty_run_directory_starts_fresh(tmp_path):
    assert resume_from.choose("auto", tmp_path, overwrite=False) is None
    assert resume_from.choose(None, tmp_path, overwrite=False) is None


@pytest.mark.slow
def test_a_relaunch_without_last_pt_resumes_from_the_newest_step_file(tmp_path):
    """Issue 26: a missing last.pt used to start at step 0 and overwrite the step files."""
    run_dir = tmp_path / "run"
    args = ["trainer.batch_size=16", "trainer.ckpt_every_steps=2", "trainer.eval_every=100"]
    train(run_dir, *args, "trainer.max_steps=6")
    (run_dir / "checkpoints" / checkpoint.LAST).unlink()
    before = (run_dir / "checkpoints" / "step-00000006.pt").stat().st_mtime_ns
    cmd = command(run_dir, *args, "trainer.max_steps=8", nproc=2)
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "last.pt is missing: resuming from" in output and "step-00000006.pt" in output
    assert "at epoch 0, step 6, sample 96" in output, output[-4000:]
    assert (run_dir / "checkpoints" / "step-00000006.pt").stat().st_mtime_ns == before
    # max_steps=8 x the first launch's 16 samples: one step of 2 x 16 after step 6
    assert checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)["step"] == 7
