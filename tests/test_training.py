"""train.py end to end (real torchrun launches), plus its config, data and checkpoint pieces."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from syncbn.training import checkpoint, data
from tests.launch import QUIET, ROOT, env, train, wait_for
from tests.test_config import compose_config

EQUIVALENCE = ["trainer.augment=false", "trainer.max_steps=24", "seed=3"]


@pytest.mark.slow
def test_syncbn_on_2_ranks_follows_bn_on_the_global_batch(tmp_path):
    """2 ranks x 8 with SyncBN take the very steps of 1 process x 16 with BN; 2 x 8 BN do not."""
    reference = train(tmp_path / "bn16", *EQUIVALENCE, "norm=bn", "trainer.batch_size=16")
    synced = train(
        tmp_path / "sync2x8", *EQUIVALENCE, "norm=syncbn", "trainer.batch_size=8", nproc=2
    )
    local = train(tmp_path / "bn2x8", *EQUIVALENCE, "norm=bn", "trainer.batch_size=8", nproc=2)

    ref = np.array(reference["train_loss_history"])
    assert len(ref) == 24 and synced["steps"] == 24 and synced["world_size"] == 2
    np.testing.assert_allclose(synced["train_loss_history"], ref, rtol=0, atol=1e-4)
    assert np.max(np.abs(np.array(local["train_loss_history"]) - ref)) > 1e-2
    for metrics in (reference, synced, local):  # exact validation: every sample once
        assert metrics["val_count"] == 359
    assert abs(synced["val_acc"] - reference["val_acc"]) < 1e-6


@pytest.mark.slow
def test_precise_bn_and_telemetry_leave_training_untouched(tmp_path):
    """trainer.precise_bn_batches evaluates with both statistics; bn_telemetry_every records."""
    args = [*EQUIVALENCE, "norm=syncbn", "trainer.batch_size=8"]
    plain = train(tmp_path / "plain", *args, nproc=2)
    observed = ["trainer.precise_bn_batches=30", "trainer.bn_telemetry_every=8"]
    precise = train(tmp_path / "precise", *args, *observed, nproc=2)
    assert precise["train_loss_history"] == plain["train_loss_history"]
    assert precise["val_acc_ema"] == plain["val_acc"]  # the same model, the same EMA statistics
    assert precise["val_loss_ema"] == plain["val_loss"]
    assert precise["val_loss"] != plain["val_loss"]  # evaluated with other statistics
    (point,) = precise["val_history"]
    assert point["acc_ema"] == plain["val_acc"] and point["acc"] == precise["val_acc"]
    assert [t["step"] for t in precise["bn_telemetry"]] == [8, 16, 24]
    for record in precise["bn_telemetry"]:
        assert record["bn/features.1/global_count"] == 2 * 8 * 8 * 8  # 2 ranks x 8 digits, 8x8
        assert 0 < record["bn/mean_drift"] < record["bn/mean_drift_max"] * 1.0001
    assert plain["bn_telemetry"] == []


@pytest.mark.slow
def test_default_job_learns_digits_and_logs_offline_to_wandb(tmp_path):
    run_dir = tmp_path / "run"
    metrics = train(
        run_dir, "trainer.epochs=6", "logger.mode=offline", "trainer.log_every=1", nproc=2
    )
    assert metrics["val_acc"] >= 0.95
    assert metrics["samples_per_s"] > 0 and metrics["wall_time_s"] > 0
    assert len(metrics["train_loss_history"]) == metrics["steps"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    content = records.read_bytes()
    for name in (b"train/loss", b"train/lr", b"val/acc", b"val/loss", b"final/val_acc"):
        assert name in content, f"{name!r} not logged to the offline W&B run"


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    args = ["trainer.epochs=5", "trainer.augment=true", "trainer.batch_size=64"]
    uninterrupted = train(tmp_path / "whole", *args)

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUIET, *args]
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = run_dir / "checkpoints" / "last.pt"
    wait_for(lambda: last.exists() or process.poll() is not None, "the first checkpoint")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"
    epochs_done = checkpoint.load(last)["epoch"]
    assert 1 <= epochs_done < 5

    resumed = train(run_dir, *args)  # trainer.resume=auto is the default
    assert resumed["train_loss_history"] == uninterrupted["train_loss_history"]
    assert resumed["val_acc"] == uninterrupted["val_acc"]


# ----------------------------------------------------------------------------- data


def _write_cifar_batch(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, size=n).tolist(),
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_cifar10_reads_the_python_pickle_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in (1, 2):
        _write_cifar_batch(folder / f"data_batch_{i}", 6, i)
    _write_cifar_batch(folder / "test_batch", 4, 9)
    splits = data.load(compose_config("data=cifar10", f"data.root={tmp_path}").data)
    assert len(splits.train) == 12 and len(splits.val) == 4
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert (splits.in_channels, splits.num_classes) == (3, 10)


def test_cifar10_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1 \(got data.root="
    ):
        data.load(compose_config("data=cifar10", f"data.root={tmp_path}").data)


@pytest.mark.slow
def test_more_ranks_times_batch_than_samples_is_rejected_before_training(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", *QUIET,
           "trainer.batch_size=1500"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env(WORLD_SIZE="1"), capture_output=True, text=True)
    assert done.returncode == 78  # a configuration error: exit_codes.CONFIG
    assert "trainer.batch_size x world size = 1500 x 1 expected at most the 1438 training" in (
        done.stderr
    )
    assert not (tmp_path / "checkpoints").exists()


def test_validation_shards_cover_every_sample_once():
    shards = [list(data.ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
