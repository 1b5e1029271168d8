"""What a run says when it stops: status.json after a configuration error, messages that name what
was non-finite (the loss, the gradients, or the parameters after an update), and the mixed-layer
message that does not guess the widths. In-process, one rank, a few steps on digits."""

from __future__ import annotations

import json
import logging

import pytest

from syncbn.moments import MIXED_LAYERS_MESSAGE
from syncbn.training import ConfigError, loop, report
from syncbn.training.lifecycle import exit_codes
from syncbn.training.lifecycle.run_lock import RunLock
from syncbn.training.steplog import StepRecord
from tests.support.config import compose_config


def _cfg(tmp_path, *overrides: str):
    return compose_config(f"run_dir={tmp_path}", "logger.mode=disabled", "trainer.progress=false",
                          *overrides)  # fmt: skip


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_steps=-1", "trainer.max_steps"),  # refused by validate()
        ("trainer.batch_size=5000", "trainer.batch_size"),  # refused while building the run
    ],
)
def test_a_configuration_error_replaces_a_stale_status_with_config(tmp_path, override, key):
    exit_codes.write_status(tmp_path, exit_codes.OK, step=10)  # an earlier run's "finished"
    with pytest.raises(ConfigError):
        loop.run(_cfg(tmp_path, "trainer.max_steps=2", override))
    status = json.loads((tmp_path / exit_codes.STATUS).read_text())
    assert status["state"] == "config" and status["exit_code"] == exit_codes.CONFIG, status
    assert key in status["error"], status


def test_a_configuration_error_leaves_the_status_of_a_job_training_in_the_directory(tmp_path):
    """Another live job holds the run directory (its lock, fresh): its status.json is its own,
    and a second launch with a bad value does not overwrite it."""
    exit_codes.write_status(tmp_path, None, step=10)  # running
    before = (tmp_path / exit_codes.STATUS).read_text()
    holder = RunLock(tmp_path, job_id="another-job")
    holder.record = {**holder.record, "host": "another-host"}  # alive as far as we can tell
    holder._content = json.dumps(holder.record)
    holder.acquire()
    try:
        with pytest.raises(ConfigError):
            loop.run(_cfg(tmp_path, "trainer.max_steps=-1"))
    finally:
        holder.release()
    assert (tmp_path / exit_codes.STATUS).read_text() == before


def test_the_mixed_layer_message_does_not_claim_the_widths_agree():
    message = MIXED_LAYERS_MESSAGE.format(name="stem")
    assert "same width" not in message
    assert "another number of channels" in message


def test_a_skipped_step_with_a_finite_loss_blames_the_gradients(caplog):
    with caplog.at_level(logging.WARNING):
        report.nonfinite_skipped(StepRecord(3, 0.1, 1.0958e32, True))
        report.nonfinite_skipped(StepRecord(4, 0.1, float("nan"), True))
    first, second = caplog.messages
    assert "non-finite gradients (loss 1.0958e+32)" in first and "non-finite loss" not in first
    assert "step 4: non-finite loss nan" in second


def test_an_update_that_overflows_the_weights_stops_the_run_at_the_next_sync(tmp_path, caplog):
    """Finite loss and gradients, but a learning rate that takes the weights to inf: SkipGuard
    cannot see it (it checks the gradients), the parameters are checked where the loss is."""
    cfg = _cfg(tmp_path, "trainer.nonfinite=skip", "optim.lr=1e300", "optim.warmup_steps=0",
               "trainer.max_steps=6", "trainer.sync_every=2",
               "trainer.max_consecutive_skips=10")  # fmt: skip
    with caplog.at_level(logging.ERROR):
        result = loop.run(cfg)
    assert result.exit_code == exit_codes.NONFINITE
    (line,) = [m for m in caplog.messages if "parameters" in m]
    assert "non-finite parameters after step 2" in line and "finite loss" in line, line
    status = json.loads((tmp_path / exit_codes.STATUS).read_text())
    assert status["step"] == 2 and status["nonfinite_step"] == 1, status
