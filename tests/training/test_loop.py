"""The training loop's GPU-ready paths, checked on CPU: no host read per step, reads every
``sync_every`` steps, gradient accumulation, label smoothing, bf16 autocast, channels_last,
``nonfinite=skip`` on the device, and PreciseBN on the training split. Runs in-process (one
process, or the gloo worker pool), a few steps on digits."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import syncbn.stepwise
from syncbn.training import data, loop, parts
from syncbn.training.lifecycle import exit_codes
from syncbn.training.lifecycle.env import DistEnv
from syncbn.training.models import build_model
from syncbn.training.state import checkpoint
from syncbn.training.state.manager import CheckpointManager
from syncbn.training.state.progress import RunState
from syncbn.training.steplog import StepLog
from tests.support.config import compose_config

CPU = DistEnv(0, 0, 1, torch.device("cpu"), None)


def _cfg(tmp_path, *overrides: str):
    return compose_config(f"run_dir={tmp_path}", "logger.mode=disabled", "trainer.progress=false",
                          *overrides)  # fmt: skip


def _train(tmp_path, *overrides: str) -> dict:
    """train.py's run() in this process (one process, no process group); its metrics.json."""
    result = loop.run(_cfg(tmp_path, *overrides))
    assert result.exit_code == 0
    return json.loads((tmp_path / "metrics.json").read_text())


LIBRARY_CPU_PATH = str(Path(syncbn.stepwise.__file__))  # its CPU path reads counts on the host


@contextlib.contextmanager
def no_host_reads():
    """Fail on any read of a tensor's value into Python (what would sync a GPU).

    SyncBatchNorm's own checks read the reduced counts on the host on its CPU path only (on CUDA
    they are device assertions; tests/layer/test_cuda_branch.py profiles that branch): allowed here.
    """

    def refuse(name):
        method = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == LIBRARY_CPU_PATH:
                return method(self, *args, **kwargs)
            raise AssertionError(f"Tensor.{name} read a device value on the host")

        return read

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _steps_without_host_reads(overrides: list[str], steps: int) -> dict:
    """On each rank: ``steps`` training steps under no_host_reads, a NaN batch on rank 1 at the
    second one; then one read of the step log (the sync point)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    env = DistEnv(rank, rank, world, torch.device("cpu"), "gloo")
    cfg = compose_config("run_dir=unused", *overrides)
    r = parts.build(cfg, env)
    log = StepLog(cfg.trainer.sync_every, env.device)
    r.train_loader.sampler.set_epoch(0)
    batches = iter(r.train_loader)
    weights_before_nan = None
    for step in range(1, steps + 1):
        x, y = next(batches)
        if step == 2:
            weights_before_nan = [p.detach().clone() for p in r.model.parameters()]
            buffers_before_nan = [b.clone() for b in r.model.buffers()]
            x = x * float("nan") if rank == 1 else x
        with no_host_reads():
            loss_sum, count, skipped = loop._train_step(r, x, y)
            log.record(step, 0.1, loss_sum, count, skipped)
        if step == 2:
            weights_after_nan = [p.detach().clone() for p in r.model.parameters()]
            buffers_after_nan = [b.clone() for b in r.model.buffers()]
    records, _ = log.read(world, False)
    unchanged = all(map(torch.equal, weights_before_nan, weights_after_nan)) and all(
        map(torch.equal, buffers_before_nan, buffers_after_nan)
    )
    return {"records": records, "unchanged_by_nan_step": unchanged}


def test_training_steps_read_nothing_on_the_host_and_skip_nan_on_the_device(run_ranks):
    """2 gloo ranks, DDP, SyncBN, two micro-batches, clipping, bf16, nonfinite=skip: no step
    reads a tensor on the host; rank 1's NaN batch makes both ranks skip that update, leaving
    weights and BN statistics as they were; the losses are read once, at the sync."""
    overrides = ["norm=syncbn", "trainer.batch_size=8", "trainer.accumulate=2",
                 "trainer.grad_clip=1.0", "trainer.nonfinite=skip", "trainer.precision=bf16",
                 "trainer.sync_every=4"]  # fmt: skip
    ranks = run_ranks(_steps_without_host_reads, 2, overrides, 4, timeout=120)
    for result in ranks:
        losses = [record.loss for record in result["records"]]
        assert [record.skipped for record in result["records"]] == [False, True, False, False]
        assert result["unchanged_by_nan_step"]
        assert losses[1] != losses[1] and all(v == v for i, v in enumerate(losses) if i != 1)
    views = [[repr(record) for record in result["records"]] for result in ranks]
    assert views[0] == views[1]  # one global view of every step


def _step_log_on_ranks() -> list:
    rank = dist.get_rank()
    log = StepLog(3, torch.device("cpu"))
    log.record(1, 0.5, torch.tensor(2.0 + rank), 2 + rank)  # uneven counts: 2 and 3
    log.record(2, 0.4, torch.tensor(float("inf") if rank else 1.0), 1, torch.tensor(0.0))
    return log.read(dist.get_world_size(), stop_requested=rank == 1)


def test_the_step_log_gives_global_means_and_any_rank_s_stop_request(run_ranks):
    for records, stop in run_ranks(_step_log_on_ranks, 2):
        assert stop  # rank 1 asked
        assert [r.step for r in records] == [1, 2] and [r.lr for r in records] == [0.5, 0.4]
        assert records[0].loss == pytest.approx((2.0 + 3.0) / (2 + 3))
        assert records[1].loss == float("inf") and not records[1].finite


LIMIT = 3  # trainer.max_consecutive_skips in the skip tests


def _synced_steps(tmp_path, losses: list[float], sync_every: int = 2) -> SimpleNamespace:
    """Steps with these global losses (non-finite ones skipped on the device) through the loop's
    sync points, ``nonfinite=skip`` and ``max_consecutive_skips=LIMIT``; where the run stopped."""
    cfg = _cfg(tmp_path, "trainer.nonfinite=skip", f"trainer.max_consecutive_skips={LIMIT}")
    model = torch.nn.Linear(2, 2)  # finite parameters: only the losses are non-finite
    parts_ = SimpleNamespace(
        cfg=cfg, env=CPU, model=model, ckpts=CheckpointManager(tmp_path, 1, None, True)
    )
    logger = SimpleNamespace(log=lambda *args, **kwargs: None)
    steps = StepLog(sync_every, CPU.device)
    r = parts.Run(parts_, RunState(reference_global_batch=8), steps, logger, 8 * len(losses))
    for step, loss in enumerate(losses, 1):
        r.state.step = step
        r.steps.record(step, 0.1, loss, 1, float(loss != loss or abs(loss) == float("inf")))
        if r.steps.full or step == len(losses):
            code = loop._sync(r, SimpleNamespace(requested=False))
            if code is not None:
                return SimpleNamespace(code=code, at=step, first=r.nonfinite_step,
                                       skipped=r.state.skipped_steps)  # fmt: skip
    return SimpleNamespace(code=None, at=None, first=None, skipped=r.state.skipped_steps)


def test_nonfinite_skip_goes_on_after_max_consecutive_skips_and_stops_after_one_more(tmp_path):
    """LIMIT non-finite steps in a row are skipped (across sync points); LIMIT + 1 stop the run
    (exit 65) at the sync that reads the one too many, naming the streak's first step."""
    nan = float("nan")
    at_limit = _synced_steps(tmp_path, [1.0, *[nan] * LIMIT, 1.0, 1.0])
    assert at_limit.code is None and at_limit.skipped == [2, 3, 4]
    over = _synced_steps(tmp_path, [1.0, *[nan] * (LIMIT + 1), 1.0, 1.0])
    assert (over.code, over.at, over.first) == (exit_codes.NONFINITE, 6, 2)
    assert over.skipped == [2, 3, 4]  # the one too many is not a skip the run went on after
    broken = _synced_steps(tmp_path, [nan] * LIMIT + [1.0] + [float("-inf")] * LIMIT)
    assert broken.code is None  # a finite step ends a streak


def test_losses_are_read_every_sync_every_steps_and_before_evaluations(tmp_path, monkeypatch):
    reads = []
    read = StepLog.read

    def counted(self, *args):
        reads.append([step for step, _ in self.pending])
        return read(self, *args)

    monkeypatch.setattr(StepLog, "read", counted)
    metrics = _train(tmp_path, "trainer.max_steps=11", "trainer.sync_every=4",
                     "trainer.eval_every_steps=6", "trainer.batch_size=16")  # fmt: skip
    assert reads == [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10], [11]]
    assert len(metrics["train_loss_history"]) == 11


def _first_batch(cfg, batch_size: int):
    """The first training batch of epoch 0, rank 0 of 1, built independently of the loop."""
    splits = data.load(cfg.data, cfg.seed, augment=True)
    indices = data.EpochShard(len(splits.train), 0, 1, batch_size, cfg.seed, 0).indices[:batch_size]
    samples = [splits.train[(i, 0)] for i in indices]
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


@pytest.mark.parametrize(("accumulate", "smoothing"), [(1, 0.0), (2, 0.0), (4, 0.1)])
def test_bn_normalizes_per_micro_batch_and_the_loss_smooths_labels(tmp_path, accumulate, smoothing):
    """The first step's loss is the mean over micro-batches of the loss of BN applied to each
    micro-batch alone (what SyncBN does too, per micro-batch across ranks)."""
    overrides = ["norm=bn", "trainer.batch_size=16", f"trainer.accumulate={accumulate}",
                 f"task.label_smoothing={smoothing}", "trainer.max_steps=1", "seed=4"]  # fmt: skip
    metrics = _train(tmp_path, *overrides)
    cfg = _cfg(tmp_path, *overrides)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, "bn", 1, 10).train()
    x, y = _first_batch(cfg, 16)
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(xs), ys, label_smoothing=smoothing)
            for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate), strict=True)
        ]
    expected = torch.stack(losses).mean().item()
    assert metrics["train_loss_history"][0] == pytest.approx(expected, rel=1e-5)


def _assert_same_losses(metrics: dict, expected: dict) -> None:
    """Two runs' training losses agree step by step (to float32 reduction-order noise)."""
    torch.testing.assert_close(
        torch.tensor(metrics["train_loss_history"]),
        torch.tensor(expected["train_loss_history"]),
        rtol=1e-4,
        atol=1e-5,
    )


def test_accumulation_without_norm_layers_takes_the_same_steps(tmp_path):
    common = ["norm=none", "trainer.batch_size=16", "trainer.max_steps=6"]
    whole = _train(tmp_path / "a", *common)
    split = _train(tmp_path / "b", *common, "trainer.accumulate=4")
    _assert_same_losses(split, whole)


def test_bf16_autocast_runs_convolutions_in_bfloat16_and_trains(tmp_path):
    r = parts.build(_cfg(tmp_path, "trainer.precision=bf16", "trainer.batch_size=16"), CPU)
    dtypes = []
    r.model.features[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    r.train_loader.sampler.set_epoch(0)
    x, y = next(iter(r.train_loader))
    loop._train_step(r, x, y)
    assert dtypes == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in r.model.parameters())  # fp32 master weights
    metrics = _train(tmp_path / "run", "trainer.precision=bf16", "trainer.max_steps=30")
    history = metrics["train_loss_history"]
    assert all(v == v for v in history) and sum(history[-5:]) < 0.6 * sum(history[:5])


def test_channels_last_keeps_the_same_steps(tmp_path):
    r = parts.build(_cfg(tmp_path, "trainer.channels_last=true"), CPU)
    conv = r.model.features[0]
    layouts = []
    conv.register_forward_hook(
        lambda m, i, o: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last))
    )
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    r.train_loader.sampler.set_epoch(0)
    loop._train_step(r, *next(iter(r.train_loader)))
    assert layouts == [True]
    common = ["trainer.max_steps=5", "trainer.batch_size=16"]
    plain = _train(tmp_path / "plain", *common)
    last = _train(tmp_path / "last", *common, "trainer.channels_last=true")
    _assert_same_losses(last, plain)


def test_precise_bn_sets_the_statistics_of_the_unaugmented_training_split(tmp_path):
    """The first BN layer's running statistics after a run with PreciseBN equal the mean and
    unbiased variance of its input over every training image, computed here from the
    checkpoint's first convolution. (The validation split, or augmented images, give others.)"""
    overrides = ["norm=bn", "trainer.max_steps=3", "trainer.precise_bn_batches=10",
                 "trainer.eval_batch_size=256", "trainer.augment=true"]  # fmt: skip
    _train(tmp_path, *overrides)
    saved = checkpoint.load(tmp_path / "checkpoints" / checkpoint.LAST)["model"]
    cfg = _cfg(tmp_path, *overrides)
    splits = data.load(cfg.data, augment=False)
    images = torch.stack([splits.train_eval[i][0] for i in range(len(splits.train_eval))])
    with torch.no_grad():
        conv = F.conv2d(images.double(), saved["features.0.weight"].double(), padding=1)
    mean = conv.mean(dim=(0, 2, 3))
    var = conv.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(saved["features.1.running_mean"].double(), mean, rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    torch.testing.assert_close(saved["features.1.running_var"].double(), var, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_training_step_never_synchronizes(tmp_path):
    """On a GPU: bf16, channels_last, skip mode; any synchronizing CUDA call raises."""
    env = DistEnv(0, 0, 1, torch.device("cuda", 0), None)
    cfg = _cfg(
        tmp_path, "trainer.precision=bf16", "trainer.channels_last=true",
        "trainer.nonfinite=skip", "trainer.grad_clip=1.0", "trainer.accumulate=2",
    )  # fmt: skip
    r = parts.build(cfg, env)
    steps = StepLog(cfg.trainer.sync_every, env.device)
    r.train_loader.sampler.set_epoch(0)
    batches = iter(r.train_loader)
    loop._train_step(r, *next(batches))  # warm-up: lazy allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            steps.record(step, 0.1, *loop._train_step(r, *next(batches)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    records, _ = steps.read(1, False)
    assert all(record.finite for record in records)
