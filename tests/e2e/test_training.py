"""train.py end to end (real torchrun launches), plus its config, data and checkpoint pieces."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from syncbn.training import data
from syncbn.training.errors import ConfigError
from syncbn.training.state import checkpoint
from tests.support.config import compose_config
from tests.support.images import write_image_folder
from tests.support.launch import QUIET, ROOT, Launch, command, env, pausing_env, train, wait_for

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
    """trainer.precise_bn_batches evaluates with both statistics; bn_telemetry_every records
    what the layers saw. 3 ranks: with 2 equal ones each rank's mean is as far from the global
    mean as the other's, and a mean drift could not be told from the worst rank's."""
    args = [*EQUIVALENCE, "norm=syncbn", "trainer.batch_size=8"]
    plain = train(tmp_path / "plain", *args, nproc=3)
    observed = ["trainer.precise_bn_batches=30", "trainer.bn_telemetry_every=8",
                "trainer.ckpt_every_steps=7", "trainer.keep_last=5"]  # fmt: skip
    precise = train(tmp_path / "precise", *args, *observed, nproc=3)
    assert precise["train_loss_history"] == plain["train_loss_history"]
    assert precise["val_acc_ema"] == plain["val_acc"]  # the same model, the same EMA statistics
    assert precise["val_loss_ema"] == plain["val_loss"]
    assert precise["val_loss"] != plain["val_loss"]  # evaluated with other statistics
    (point,) = precise["val_history"]
    assert point["acc_ema"] == plain["val_acc"] and point["acc"] == precise["val_acc"]
    assert [t["step"] for t in precise["bn_telemetry"]] == [8, 16, 24]
    for record in precise["bn_telemetry"]:
        assert record["bn/features.1/global_count"] == 3 * 8 * 8 * 8  # 3 ranks x 8 digits, 8x8
    assert plain["bn_telemetry"] == []
    # Step 8's drifts of the first layer, computed here from the weights step 8 ran with (the
    # step-7 checkpoint) and the batches each rank read at step 8.
    saved = checkpoint.load(tmp_path / "precise" / "checkpoints" / "step-00000007.pt")
    expected = _first_layer_drifts(saved["model"], compose_config(*args), step=8, ranks=3)
    recorded = precise["bn_telemetry"][0]
    assert expected["mean_drift"] < 0.99 * expected["mean_drift_max"]
    for key, value in expected.items():
        assert recorded[f"bn/features.1/{key}"] == pytest.approx(value, rel=1e-4), key


def _first_layer_drifts(model: dict, cfg, step: int, ranks: int) -> dict[str, float]:
    """``mean_drift`` and ``var_drift`` of the first BN layer (its input: the first conv of the
    un-augmented images each rank read at ``step``), as syncbn/telemetry.py defines them:
    RMS over channels of ``(mu_r - mu) / sqrt(var + eps)`` and of ``(var_r + eps) / (var + eps)
    - 1``, averaged over the ranks and the worst rank."""
    splits = data.load(cfg.data, augment=False)
    weight = model["features.0.weight"].double()
    batch = cfg.trainer.batch_size
    start = (step - 1) * batch * ranks
    outputs = []
    for rank in range(ranks):
        shard = data.EpochShard(len(splits.train), rank, ranks, batch, cfg.seed, 0, start)
        images = torch.stack([splits.train_eval[i][0] for i in shard.indices[:batch]])
        outputs.append(torch.nn.functional.conv2d(images.double(), weight, padding=1))
    everything = torch.cat(outputs)
    mean, var = everything.mean(dim=(0, 2, 3)), everything.var(dim=(0, 2, 3), unbiased=False)
    eps = 1e-5
    d_mean, d_var = [], []
    for out in outputs:
        local_mean, local_var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3), unbiased=False)
        d_mean.append(((local_mean - mean).square() / (var + eps)).mean().sqrt().item())
        d_var.append((((local_var + eps) / (var + eps) - 1).square()).mean().sqrt().item())
    return {
        "mean_drift": sum(d_mean) / ranks,
        "mean_drift_max": max(d_mean),
        "var_drift": sum(d_var) / ranks,
        "var_drift_max": max(d_var),
    }


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
    for name in (b"train/loss", b"train/lr", b"val/acc", b"val/top5", b"val/loss",
                 b"final/val_acc"):  # fmt: skip
        assert name in content, f"{name!r} not logged to the offline W&B run"
    assert 0.99 <= metrics["val_top5"] <= 1.0


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    args = ["trainer.epochs=5", "trainer.augment=true", "trainer.batch_size=64"]
    uninterrupted = train(tmp_path / "whole", *args)

    run_dir = tmp_path / "killed"
    environment, paused = pausing_env(tmp_path)
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUIET, *args]
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(lambda: paused.exists() or process.poll() is not None, "the first checkpoint")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "metrics.json").exists()
    last = run_dir / "checkpoints" / "last.pt"
    assert checkpoint.load(last)["epoch"] == 1  # paused right after it: nothing later

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


def _small_cifar10(root):
    """The splits of a 12 + 4 image CIFAR-10 written in the python-pickle format under ``root``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for i in (1, 2):
        _write_cifar_batch(folder / f"data_batch_{i}", 6, i)
    _write_cifar_batch(folder / "test_batch", 4, 9)
    return data.load(compose_config("data=cifar10", f"data.root={root}").data)


def test_cifar10_reads_the_python_pickle_format(tmp_path):
    splits = _small_cifar10(tmp_path)
    assert len(splits.train) == 12 and len(splits.val) == 4
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert (splits.in_channels, splits.num_classes) == (3, 10)


def test_cifar10_is_normalized_per_channel_with_training_statistics(tmp_path):
    splits = _small_cifar10(tmp_path)
    train = torch.stack([splits.train_eval[i][0] for i in range(len(splits.train_eval))])
    val = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    torch.testing.assert_close(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    assert val.mean(dim=(0, 2, 3)).abs().max() > 1e-3  # mapped with the training numbers


def test_cifar10_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py/data_batch_1 \(got data.root="):
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


@pytest.mark.slow
def test_segmentation_on_2_ranks_at_one_image_each_reports_mean_iou(tmp_path):
    """task=segmentation: the DeepLab model with SyncBN at 1 image per rank; val_miou in
    metrics.json, in W&B and in rank 0's log line; every validation pixel counted once."""
    run_dir = tmp_path / "run"
    launch = Launch(command(run_dir, "task=segmentation", "trainer.batch_size=1",
                            "trainer.max_steps=4", "data.num_train=16", "data.num_val=6",
                            "logger.mode=offline", "trainer.log_every=1", nproc=2))  # fmt: skip
    assert launch.wait() == 0, launch.output[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["world_size"] == 2
    assert 0 <= metrics["val_miou"] <= 1 and len(metrics["val_iou"]) == 11
    assert metrics["best"]["metric"] == "miou"
    cfg = compose_config("task=segmentation", "data.num_train=16", "data.num_val=6")
    scenes = data.load(cfg.data, augment=False)
    labelled = sum(int((scenes.val[i][1] != 255).sum()) for i in range(6))
    assert metrics["val_count"] == labelled
    assert f"val_miou {metrics['val_miou']:.4f}" in launch.output
    (records,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"val/miou" in records.read_bytes() and b"final/val_miou" in records.read_bytes()


@pytest.mark.slow
def test_your_model_by_import_path_on_your_image_folder(tmp_path):
    """model._target_ naming a class of the user's (here the tests'), data=imagefolder with PNG
    files, a DataLoader worker process kept across epochs: trains, converts to SyncBN, evaluates
    every validation image once."""
    root = write_image_folder(tmp_path / "images", per_class=6)
    metrics = train(
        tmp_path / "run", "model=custom", "model._target_=tests.support.toy_models.TinyNet",
        "+model.width=4", "data=imagefolder", f"data.root={root}", "data.image_size=16",
        "loader.workers=1", "trainer.batch_size=4", "trainer.epochs=2", "norm=syncbn",
    )  # fmt: skip
    assert metrics["val_count"] == 6 and metrics["epochs"] == 2 and metrics["steps"] == 8
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "_target_: tests.support.toy_models.TinyNet" in config and "width: 4" in config
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert saved["body.1.num_batches_tracked"] == 8  # its BatchNorm trained (as SyncBatchNorm)


def test_validation_shards_cover_every_sample_once():
    shards = [list(data.ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
