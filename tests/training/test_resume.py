"""Resume means what it says: changed keys take effect or are refused by name, progress is
counted in samples across world sizes, and eval_only evaluates a checkpoint on all ranks."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import yaml

from syncbn.training.data import EpochShard
from syncbn.training.errors import ConfigError
from syncbn.training.state import checkpoint, progress, resume_policy
from syncbn.training.state.progress import RunState
from tests.support.launch import ROOT, command, env, train

N_TRAIN = 1438  # digits training split
FIRST = ["trainer.max_steps=30", "trainer.batch_size=32", "norm=syncbn", "seed=2"]  # 2 ranks


# ----------------------------------------------------------------------------- policy


def _config(**changes) -> dict:
    config = {
        "model": {"widths": [32, 64], "blocks_per_stage": 1},
        "data": {"name": "digits", "val_fraction": 0.2, "root": None},
        "norm": {"name": "syncbn", "group_size": None},
        "optim": {"name": "sgd", "lr": 0.1},
        "trainer": {"epochs": 4, "batch_size": 32, "resume": "auto", "eval_only": False},
        "seed": 0,
        "run_dir": "a",
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section] = {**config[section], name: value}
        else:
            config[section] = value
    return config


def test_resume_policy_refuses_what_defines_the_run_and_lets_the_rest_take_effect():
    saved = _config()
    allowed = resume_policy.check(
        "ck.pt", saved, _config(optim__lr=0.05, trainer__epochs=6, data__root="/elsewhere",
                                trainer__resume="x.pt", run_dir="b"),
    )  # fmt: skip
    assert allowed == {
        "data.root": (None, "/elsewhere"),
        "optim.lr": (0.1, 0.05),
        "trainer.epochs": (4, 6),
    }
    for key, value in [
        ("model__widths", [16, 32]),
        ("norm__name", "bn"),
        ("data__val_fraction", 0.3),
        ("optim__name", "adamw"),
        ("seed", 1),
    ]:
        dotted = key.replace("__", ".")
        with pytest.raises(ConfigError, match=rf"for {dotted} \(got {dotted}: checkpoint"):
            resume_policy.check("ck.pt", saved, _config(**{key: value}))


def test_eval_only_refuses_only_another_model():
    saved = _config()
    resume_policy.check("ck.pt", saved, _config(norm__name="bn", seed=3), eval_only=True)
    with pytest.raises(ConfigError, match="model.widths"):
        resume_policy.check("ck.pt", saved, _config(model__widths=[8]), eval_only=True)


@pytest.mark.parametrize(("saved", "now"), [("syncbn", "bn"), ("bn", "syncbn")])
def test_eval_only_loads_batchnorm_and_syncbn_checkpoints_into_each_other(saved, now):
    assert resume_policy.check(
        "ck.pt", _config(norm__name=saved), _config(norm__name=now), eval_only=True
    ) == {"norm.name": (saved, now)}


@pytest.mark.parametrize(
    ("saved", "now"), [("syncbn", "none"), ("bn", "none"), ("none", "syncbn"), ("none", "bn")]
)
def test_eval_only_refuses_a_change_to_or_from_norm_none_either_way(saved, now):
    """A norm=none model has no norm parameters: it is another model in both directions."""
    with pytest.raises(ConfigError, match=rf"norm.name: checkpoint '{saved}', now '{now}'"):
        resume_policy.check(
            "ck.pt", _config(norm__name=saved), _config(norm__name=now), eval_only=True
        )


def test_a_changed_global_batch_is_a_warning_that_says_what_syncbn_normalizes_over():
    saved = {"world_size": 2, "config": _config()}
    assert resume_policy.warn_if_batch_changed(saved, 2, 32, "syncbn", None) is None
    message = resume_policy.warn_if_batch_changed(saved, 3, 32, "syncbn", None)
    assert "from 64 (2 ranks x 32) to 96 (3 ranks x 32)" in message
    assert "SyncBatchNorm now normalizes over 96 samples per layer instead of 64" in message


def test_a_changed_sync_group_is_a_warning_with_the_group_s_batch():
    """norm.group_size sets what SyncBN normalizes over: 4 ranks in groups of 2 normalize over
    64 samples, in one group over 128, though the global batch stays 4 x 32."""
    grouped = {"world_size": 4, "config": _config(norm__group_size=2)}
    assert resume_policy.warn_if_batch_changed(grouped, 4, 32, "syncbn", 2) is None
    message = resume_policy.warn_if_batch_changed(grouped, 4, 32, "syncbn", None)
    expected = "SyncBatchNorm now normalizes over 128 samples per layer instead of 64"
    # and not that the global batch changed: 4 x 32 before and after
    assert message == f"resume: {expected} (norm.group_size 2 -> null)"
    message = resume_policy.warn_if_batch_changed(grouped, 8, 32, "syncbn", 2)
    assert "from 128 (4 ranks x 32) to 256 (8 ranks x 32)" in message
    assert "SyncBatchNorm" not in message  # still groups of 2 ranks x 32: 64 samples per layer
    whole = {"world_size": 2, "config": _config()}
    assert resume_policy.warn_if_batch_changed(whole, 2, 32, "syncbn", 2) is None  # the same


def test_progress_in_samples_trains_the_epochs_asked_for_on_any_world_size():
    """A 2-rank run stopped 512 samples into epoch 1, planned for 2 epochs on 1, 2 or 3 ranks."""
    trainer = type("T", (), {"max_steps": None, "epochs": 2})
    stopped = RunState(reference_global_batch=64, epoch=1, epoch_offset=512, samples=1920)
    for ranks in (1, 2, 3):
        g = 32 * ranks
        total = progress.total_samples(trainer, stopped, N_TRAIN, g)
        assert total == 1920 + (N_TRAIN - 512) // g * g
        assert 2 * (N_TRAIN - g) < total <= 2 * N_TRAIN  # two passes, less the dropped tails
    trainer.max_steps = 40  # counted in the first launch's global batch of 64
    assert progress.total_samples(trainer, stopped, N_TRAIN, 96) == 40 * 64


def test_max_steps_finishes_on_samples_of_the_first_launch_s_global_batch_not_on_steps():
    """max_steps=30 of 2 ranks x 32 is 1,920 samples: 15 steps on 2 ranks then 15 on 1 rank
    are 1,440 of them (30 steps, not finished); 15 more steps on 1 rank finish it, exactly."""
    trainer = type("T", (), {"max_steps": 30, "epochs": 1})
    state = RunState(reference_global_batch=64)
    for global_batch, steps in ((64, 15), (32, 15)):
        for _ in range(steps):
            assert not progress.finished(trainer, state)
            state.step, state.samples = state.step + 1, state.samples + global_batch
    assert (state.step, state.samples) == (30, 1440)
    for _ in range(15):
        assert not progress.finished(trainer, state)
        state.step, state.samples = state.step + 1, state.samples + 32
    assert state.samples == 1920 and progress.finished(trainer, state)
    state.samples -= 1  # one sample short of the plan
    assert not progress.finished(trainer, state)


def test_epochs_finish_on_completed_passes_not_on_steps_or_samples():
    trainer = type("T", (), {"max_steps": None, "epochs": 2})
    assert not progress.finished(trainer, RunState(64, epoch=1, epoch_offset=1408, samples=2816))
    assert progress.finished(trainer, RunState(64, epoch=2, samples=2816, step=1))


def test_epoch_shards_continue_one_permutation_from_any_offset_on_any_world_size():
    whole = EpochShard(N_TRAIN, 0, 1, 64, seed=2, epoch=1).indices
    for ranks, batch in ((2, 32), (3, 32), (1, 32)):
        shards = [EpochShard(N_TRAIN, r, ranks, batch, seed=2, epoch=1, start=512).indices
                  for r in range(ranks)]  # fmt: skip
        g = ranks * batch
        for k in range(len(shards[0]) // batch):  # the ranks' k-th batches = global batch k
            together = sorted(i for s in shards for i in s[k * batch : (k + 1) * batch])
            position = 512 + k * g
            expected = EpochShard(N_TRAIN, 0, 1, 1, seed=2, epoch=1).indices
            assert together == sorted(expected[position : position + g])
    assert whole[:8] == EpochShard(N_TRAIN, 0, 1, 1, seed=2, epoch=1).indices[:8]


# ----------------------------------------------------------------------------- real resumes


@pytest.fixture(scope="module")
def stopped_mid_epoch(tmp_path_factory):
    """A 2-rank run of 30 steps: its last checkpoint is 1920 samples in, 512 into epoch 1."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    metrics = train(run_dir, *FIRST, nproc=2)
    saved = checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)
    assert (saved["epoch"], saved["epoch_offset"], saved["samples"]) == (1, 512, 1920)
    return run_dir, metrics


def _copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [3, 1])
def test_a_2_rank_checkpoint_resumed_on_other_world_sizes_trains_the_epochs_asked_for(
    tmp_path, stopped_mid_epoch, ranks
):
    run_dir = _copy(stopped_mid_epoch[0], tmp_path)
    overrides = [*FIRST, "trainer.max_steps=null", "trainer.epochs=2"]
    if ranks == 1:  # and a new learning rate, which must take effect
        overrides += ["optim.lr=0.05", "optim.schedule=constant"]
    cmd = command(run_dir, *overrides, nproc=ranks)
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    g = 32 * ranks
    assert metrics["epochs"] == 2 and metrics["world_size"] == ranks
    assert metrics["samples"] == 1920 + (N_TRAIN - 512) // g * g  # not 2.5 or 1.5 passes
    assert metrics["steps"] == 30 + (N_TRAIN - 512) // g
    assert f"to {g} ({ranks} ranks x 32); SyncBatchNorm now normalizes over {g}" in output
    if ranks == 1:
        assert "resume: changed optim.lr 0.1 -> 0.05" in output
        assert metrics["lr"] == 0.05  # not the checkpoint's schedule
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.05


@pytest.mark.slow
def test_resume_with_a_changed_model_is_refused_naming_the_keys(tmp_path, stopped_mid_epoch):
    run_dir = _copy(stopped_mid_epoch[0], tmp_path)
    cmd = command(run_dir, *FIRST, "model.widths=[16,32]", "seed=7")
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 78, done.stderr[-3000:]
    assert "for model.widths, seed (got model.widths: checkpoint [32, 64], now [16, 32]" in (
        done.stderr
    )
    assert "cannot change on resume" in done.stderr and "Traceback" not in done.stderr
    assert checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)["step"] == 30


@pytest.mark.slow
def test_eval_only_evaluates_a_checkpoint_on_all_ranks_and_writes_metrics(
    tmp_path, stopped_mid_epoch
):
    run_dir, trained = stopped_mid_epoch
    path = run_dir / "checkpoints" / checkpoint.LAST
    out = tmp_path / "eval"
    metrics = train(out, *FIRST, "trainer.eval_only=true", f"trainer.resume={path}", nproc=3)
    assert metrics["eval_only"] and metrics["world_size"] == 3 and metrics["step"] == 30
    assert metrics["val_count"] == 359  # every validation sample once, over 3 ranks
    assert metrics["val_acc"] == trained["val_acc"]  # the model the 2-rank run ended with
    assert math.isclose(metrics["val_loss"], trained["val_loss"], rel_tol=1e-6)  # float32 sums
    assert not (out / "checkpoints").exists()
