"""A non-finite loss stops the run (exit 65) or skips the step, on all ranks at once, and never
ends up in a checkpoint. A NaN batch is injected into rank 1 only, at its 7th step. (Since the
loop reads losses every ``trainer.sync_every`` steps instead of every step, ``stop`` acts at the
next read: status.json's ``step`` is that read, ``nonfinite_step`` the bad step.)"""

from __future__ import annotations

import json
import math
import os
import textwrap

import pytest
import torch

from syncbn.training.state import checkpoint
from tests.support.launch import ROOT, Launch, command, env, status

pytestmark = pytest.mark.slow

NAN_ON_RANK_1_AT_STEP_7 = textwrap.dedent(
    """
    import os
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RUN_ID"):
        import syncbn.training.loop as loop

        train_step, calls = loop._train_step, []

        def poisoned_step(r, x, y, *rest):
            calls.append(1)
            if len(calls) == 7:
                x = x * float("nan")
            return train_step(r, x, y, *rest)

        loop._train_step = poisoned_step
    """
)
JOB = ["trainer.max_steps=12", "trainer.ckpt_every_steps=5", "trainer.eval_every_steps=5",
       "norm=syncbn", "trainer.batch_size=16"]  # fmt: skip


def _launch(tmp_path, *overrides: str) -> Launch:
    (tmp_path / "sitecustomize.py").write_text(NAN_ON_RANK_1_AT_STEP_7)  # runs at start-up
    environment = env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    return Launch(command(tmp_path / "run", *JOB, *overrides, nproc=2), environment)


def _finite(path) -> bool:
    model = checkpoint.load(path)["model"]
    return all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def test_stop_ends_every_rank_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    launch = _launch(tmp_path, "trainer.nonfinite=stop")
    assert launch.wait() != 0
    output = launch.output
    assert "step 7: non-finite loss nan; stopping (trainer.nonfinite=stop)" in output, output
    assert "exitcode  : 65" in output  # torchrun's summary of the workers
    run_dir = tmp_path / "run"
    record = status(run_dir)
    assert (record["state"], record["exit_code"], record["nonfinite_step"]) == ("nonfinite", 65, 7)
    # Losses are read every trainer.sync_every (10) steps and before checkpoints: the run stops
    # at the first read after step 7, before writing the step-10 checkpoint.
    assert record["step"] == 10
    last = run_dir / "checkpoints" / checkpoint.LAST
    assert checkpoint.load(last)["step"] == 5 and _finite(last)
    assert not (run_dir / "metrics.json").exists()


def test_skip_drops_that_update_on_every_rank_and_training_goes_on(tmp_path):
    launch = _launch(tmp_path, "trainer.nonfinite=skip")
    assert launch.wait() == 0, launch.output[-4000:]
    assert "step 7: non-finite loss nan: update skipped" in launch.output
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    losses = metrics["train_loss_history"]
    assert metrics["skipped_steps"] == [7] and metrics["steps"] == 12
    assert math.isnan(losses[6]) and all(math.isfinite(v) for i, v in enumerate(losses) if i != 6)
    # The NaN batch's statistics did not stay in the running averages: evaluation is finite.
    assert math.isfinite(metrics["val_loss"]) and metrics["val_acc"] > 0.1
    assert _finite(run_dir / "checkpoints" / checkpoint.LAST)
