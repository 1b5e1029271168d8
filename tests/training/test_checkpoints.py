"""Checkpoint files and the checkpoint manager: atomic writes, temp files of live writers left
alone, keep-last-K, best-by-metric, and no non-finite model written over a good checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from syncbn.training import loop
from syncbn.training.lifecycle.env import DistEnv
from syncbn.training.state import checkpoint
from syncbn.training.state.manager import BEST, CheckpointManager
from syncbn.training.state.progress import RunState
from tests.support.launch import env, wait_for


def _state(step: int, value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((2,), value)}, "optimizer": {}, "epoch": 0, "step": step}


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    target = tmp_path / checkpoint.LAST
    checkpoint.write_atomic(_state(5), target)
    with pytest.raises(Exception):  # noqa: B017 - any pickling error mid-write
        checkpoint.write_atomic({"model": {}, "bad": lambda: None}, target)
    state = checkpoint.load(target)
    assert state["step"] == 5 and torch.equal(state["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.LAST]  # no temp file left behind


def test_corrupted_or_foreign_checkpoint_gets_a_clear_error(tmp_path):
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupted or not a syncbn training checkpoint"):
        checkpoint.load(corrupted)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(RuntimeError, match="missing \\['epoch', 'model', 'optimizer', 'step'\\]"):
        checkpoint.load(foreign)


def test_only_temp_files_of_dead_writers_on_this_host_are_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = checkpoint._host()
    try:
        names = {
            "live": f".last.pt.{host}.{live.pid}.abc123.tmp",
            "dead": f".last.pt.{host}.{dead.pid}.abc123.tmp",
            "other host": f".last.pt.another-node.{dead.pid}.abc123.tmp",
            "foreign": ".something-else.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        checkpoint.write_atomic(_state(1), tmp_path / checkpoint.LAST)
        left = {p.name for p in tmp_path.iterdir()}
        assert names["dead"] not in left
        assert {names["live"], names["other host"], names["foreign"]} <= left
    finally:
        live.kill()
        live.wait()


CONCURRENT_WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from syncbn.training.state import checkpoint
    state = {"model": {"w": torch.zeros(2_000_000)}, "optimizer": {}, "epoch": 0, "step": 1}
    for _ in range(int(sys.argv[2])):
        checkpoint.write_atomic(state, Path(sys.argv[1]) / "last.pt")
    """
)


def test_two_writers_in_one_directory_never_break_each_other(tmp_path):
    """The relaunch-next-to-an-orphan race: each writer's temp file survives the other's cleanup
    (the old cleanup deleted every temp file, and the other writer's os.replace then failed with
    FileNotFoundError)."""
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, str(tmp_path), "15"],
            env=env(),
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err[-2000:]
    assert checkpoint.load(tmp_path / checkpoint.LAST)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.LAST]


def test_kill_during_a_write_leaves_the_previous_checkpoint_and_the_next_write_cleans_up(
    tmp_path,
):
    target = tmp_path / checkpoint.LAST
    checkpoint.write_atomic(_state(4), target)
    writer = subprocess.Popen(
        [sys.executable, "-c", CONCURRENT_WRITER.replace("2_000_000", "64_000_000"),
         str(tmp_path), "1000"], env=env(),
    )  # fmt: skip
    wait_for(
        lambda: any(p.suffix == ".tmp" and p.stat().st_size > 1_000_000 for p in _files(tmp_path)),
        "the writer to be halfway through a 256 MB checkpoint",
        timeout=60,
    )
    writer.kill()
    writer.wait()
    assert checkpoint.load(target)["step"] == 4  # the previous checkpoint, whole
    assert any(p.suffix == ".tmp" for p in tmp_path.iterdir())  # the killed writer's leftover
    checkpoint.write_atomic(_state(5), target)  # its writer is dead: removed
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.LAST]


def _files(directory: Path) -> list[Path]:
    found = []
    for p in directory.iterdir():
        try:
            p.stat()
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
        found.append(p)
    return found


def test_manager_keeps_last_k_step_files_and_last_pt_is_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, best_metric=None, writer=True)
    for step in (10, 20, 30, 40):
        manager.save(_state(step))
    assert [p.name for p in manager.step_files()] == ["step-00000030.pt", "step-00000040.pt"]
    assert checkpoint.load(manager.last)["step"] == 40
    assert os.path.samefile(manager.last, manager.step_path(40))  # a link, not a second write


@pytest.mark.parametrize(
    ("metric", "values", "best_step"),
    [
        ("acc", [0.5, 0.9, 0.7], 20),
        ("top5", [0.5, 0.9, 0.7], 20),
        ("miou", [0.3, 0.6, 0.4], 20),
        ("loss", [0.5, 0.2, 0.3], 20),
    ],
)
def test_manager_keeps_the_best_checkpoint_by_metric(tmp_path, metric, values, best_step):
    manager = CheckpointManager(tmp_path, keep_last=1, best_metric=metric, writer=True)
    best = None
    for step, value in zip((10, 20, 30), values, strict=True):
        state = _state(step, value)
        manager.save(state)
        if manager.improved({metric: value}, best):
            best = {"metric": metric, "value": value, "step": step}
            manager.save_best(lambda state=state: state, step)
    saved = checkpoint.load(tmp_path / BEST)
    assert saved["step"] == best_step == best["step"]
    assert [p.name for p in manager.step_files()] == ["step-00000030.pt"]  # best.pt kept its data
    assert not manager.improved({metric: float("nan")}, best)


@pytest.mark.parametrize("metric", ["acc", "top5", "miou", "loss"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")])
def test_a_non_finite_validation_metric_never_becomes_best(tmp_path, metric, bad):
    """NaN, -inf and inf are never the best, as the first evaluation or after a finite best
    (-inf would beat any loss, inf any accuracy, by comparison alone)."""
    manager = CheckpointManager(tmp_path, keep_last=1, best_metric=metric, writer=True)
    assert not manager.improved({metric: bad}, None)
    for value in (0.5, 1e9, -1e9):
        assert not manager.improved({metric: bad}, {"metric": metric, "value": value, "step": 1})
    assert manager.improved({metric: 0.5}, None)  # a finite first evaluation is the best so far


def test_a_model_with_nan_is_never_written_over_a_good_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    manager = CheckpointManager(tmp_path, keep_last=3, best_metric=None, writer=True)
    parts = SimpleNamespace(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        env=DistEnv(0, 0, 1, torch.device("cpu"), None),
        ckpts=manager,
        config={},
    )
    run = SimpleNamespace(parts=parts, state=RunState(reference_global_batch=8, step=10))
    assert loop._checkpoint(run)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    run.state.step = 20
    assert not loop._checkpoint(run)
    assert checkpoint.load(manager.last)["step"] == 10
    assert [p.name for p in manager.step_files()] == ["step-00000010.pt"]
