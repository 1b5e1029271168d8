"""What train.py runs: set up, train with DDP, evaluate exactly, checkpoint, log, write metrics.

Read top to bottom: :func:`run` validates and joins the process group; :func:`_train` builds the
run's parts (:class:`Run`: data, task, model, optimizer, loaders), resumes if there is a
checkpoint, and drives :func:`_fit`, the loop over steps. Each step is :func:`_train_step`, which
never waits for the device; every ``trainer.sync_every`` steps, and before anything that needs
them, :func:`_sync` reads the steps' losses (one all-reduce) and acts on NaN and stop requests.
What differs between tasks (loss, metrics) comes from :mod:`syncbn.training.tasks`; signals,
checkpoint files, the resume policy, progress in samples, the schedule and W&B live in their own
modules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..precise_bn import precise_bn
from ..telemetry import BNTelemetry
from . import data, optim, tasks
from .config import validate
from .errors import ConfigError
from .lifecycle import exit_codes
from .lifecycle.env import DistEnv, setup, teardown
from .lifecycle.orphan import under_torchrun, watch_parent
from .lifecycle.preemption import StopRequest
from .models import build_model, count_norm_layers
from .nonfinite import SkipGuard
from .state import checkpoint, progress, resume_policy
from .state.manager import CheckpointManager
from .state.progress import RunState
from .steplog import StepLog, StepRecord
from .wandb_logger import WandbLogger

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    exit_code: int  # syncbn.training.lifecycle.exit_codes
    metrics: dict = field(default_factory=dict)  # what rank 0 wrote to metrics.json
    objective: float | None = None  # the task's primary validation metric (Hydra sweepers)


@dataclass
class Run:
    """The parts of one training run, built once by :func:`_build`."""

    cfg: Any
    env: DistEnv
    run_dir: Path
    config: dict  # cfg resolved to plain containers: config.yaml, checkpoints, W&B
    splits: data.Splits
    task: tasks.Task
    model: torch.nn.Module  # what the checkpoints hold
    net: torch.nn.Module  # what runs: model, wrapped in DDP and/or torch.compile
    ddp: DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    val_loader: DataLoader
    ckpts: CheckpointManager
    state: RunState
    steps: StepLog  # losses of the steps since the last sync, on the device
    guard: SkipGuard | None  # trainer.nonfinite=skip
    precise: Any  # () -> None: re-estimates the BN statistics before an evaluation, or None
    telemetry: BNTelemetry | None
    logger: WandbLogger | None = None
    total_samples: int = 0  # the run's plan, from the current state on
    skips_in_a_row: int = 0
    nonfinite_step: int | None = None  # the first non-finite step, when the run stops on one

    @property
    def global_batch(self) -> int:
        return self.cfg.trainer.batch_size * self.env.world_size


def run(cfg) -> RunResult:
    """Train (or, with ``trainer.eval_only``, evaluate) as ``cfg`` says, on every rank.

    Raises :class:`ConfigError` for a bad configuration; other outcomes are exit codes.
    """
    validate(cfg)
    if under_torchrun():
        watch_parent(cfg.dist.orphan_grace_s)  # exit when the torchrun agent dies
    env = setup(str(cfg.dist.backend), cfg.dist.timeout_s, cfg.dist.init_method)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.trainer.cudnn_benchmark)
    try:
        if cfg.trainer.eval_only:
            return _evaluate_checkpoint(cfg, env)
        return _train(cfg, env)
    finally:
        teardown(env)


def _train(cfg, env: DistEnv) -> RunResult:
    r = _build(cfg, env)
    resume_from = checkpoint.resolve(cfg.trainer.resume, r.run_dir)
    if resume_from is not None:
        _resume(r, resume_from)
    r.total_samples = progress.total_samples(
        cfg.trainer, r.state, len(r.splits.train), r.global_batch
    )
    if env.is_main:
        (r.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(r.config))
        exit_codes.write_status(r.run_dir, None, step=r.state.step, samples=r.state.samples)
    r.logger = WandbLogger(cfg.logger, r.run_dir, r.config, enabled=env.is_main)
    code, metrics = exit_codes.CRASHED, {}
    try:
        with StopRequest() as stop:
            code, val = _fit(r, stop)
        if code == exit_codes.OK:
            metrics = _finish(r, val)
    finally:
        r.logger.finish(code, preempted=code == exit_codes.PREEMPTED)
        if env.is_main:
            extra = {} if r.nonfinite_step is None else {"nonfinite_step": r.nonfinite_step}
            exit_codes.write_status(
                r.run_dir, code, step=r.state.step, samples=r.state.samples, epoch=r.state.epoch,
                checkpoint=str(r.ckpts.last) if r.ckpts.last.is_file() else None, **extra,
            )  # fmt: skip
    return RunResult(code, metrics, metrics.get(f"val_{r.task.primary}"))


def _build(cfg, env: DistEnv) -> Run:
    t = cfg.trainer
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.manual_seed(cfg.seed)  # same model initialization on every rank
    splits = data.load(cfg.data, cfg.seed, bool(t.augment))
    if env.world_size * t.batch_size > len(splits.train):
        raise ConfigError(
            f"trainer.batch_size x world size = {t.batch_size} x {env.world_size} "
            f"expected at most the {len(splits.train)} training samples; use fewer ranks or a "
            f"smaller batch_size"
        )
    task = tasks.build(cfg.task, splits)
    model = _model(cfg, splits, env)
    net, ddp = model, None
    if env.world_size > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        net = ddp = DistributedDataParallel(model, device_ids=device_ids)
    if t.compile:
        net = torch.compile(net)
    optimizer = optim.build(cfg.optim, model)
    loaders = partial(_loaders, cfg, env)
    train_eval = loaders(splits.train_eval, t.eval_batch_size)
    precise = None
    if t.precise_bn_batches:
        precise = partial(precise_bn, model, train_eval, t.precise_bn_batches,
                          forward=partial(_forward_precise, cfg, env))  # fmt: skip
    return Run(
        cfg=cfg,
        env=env,
        run_dir=run_dir,
        config=config,
        splits=splits,
        task=task,
        model=model,
        net=net,
        ddp=ddp,
        optimizer=optimizer,
        train_loader=data.train_loader(
            splits.train, t.batch_size, env.rank, env.world_size, cfg.seed, cfg.loader, env.device
        ),  # fmt: skip
        val_loader=loaders(splits.val, t.eval_batch_size),
        ckpts=CheckpointManager(run_dir / "checkpoints", t.keep_last, t.best_metric, env.is_main),
        state=RunState(reference_global_batch=t.batch_size * env.world_size),
        steps=StepLog(t.sync_every, env.device),
        guard=SkipGuard(model, optimizer) if t.nonfinite == "skip" else None,
        precise=precise,
        telemetry=_telemetry(cfg, model),
    )


def _loaders(cfg, env: DistEnv, dataset, batch_size: int) -> DataLoader:
    return data.eval_loader(dataset, batch_size, env.rank, env.world_size, cfg.loader, env.device)


def _model(cfg, splits: data.Splits, env: DistEnv) -> torch.nn.Module:
    """The configured model on the run's device, checked against the batch it will train on."""
    model = build_model(
        cfg.model,
        str(cfg.norm.name),
        splits.in_channels,
        splits.num_classes,
        cfg.norm.group_size,
        debug=cfg.norm.debug,
        check_finite=cfg.norm.check_finite,
    )
    if str(cfg.norm.name) != "none" and not count_norm_layers(model):
        log.warning("norm=%s: the model has no BatchNorm layer to use it", cfg.norm.name)
    check = getattr(model, "check_batch", None)
    if check is not None and not cfg.trainer.eval_only:
        micro_batch = cfg.trainer.batch_size // cfg.trainer.accumulate
        problem = check(micro_batch)
        if problem:
            raise ConfigError(
                f"{type(model).__name__} with norm={cfg.norm.name} expected more than "
                f"{micro_batch} image per rank and micro-batch (got trainer.batch_size="
                f"{cfg.trainer.batch_size}, trainer.accumulate={cfg.trainer.accumulate}): {problem}"
            )
    model = model.to(env.device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _resume(r: Run, path: Path) -> None:
    """Load the checkpoint at ``path`` into ``r`` under the resume policy (resume_policy.py)."""
    saved = checkpoint.load(path, map_location=r.env.device)
    resume_policy.check(path, saved.get("config"), r.config)
    if r.env.is_main:
        resume_policy.warn_if_batch_changed(
            saved, r.env.world_size, r.cfg.trainer.batch_size, str(r.cfg.norm.name),
            r.cfg.norm.group_size,
        )  # fmt: skip
    r.model.load_state_dict(saved["model"])
    r.optimizer.load_state_dict(saved["optimizer"])
    optim.apply_hparams(r.optimizer, r.cfg.optim)  # the config's values, not the checkpoint's
    r.state = RunState.from_checkpoint(saved, r.global_batch)
    log.info(
        "resumed from %s at epoch %d, step %d, sample %d",
        path,
        r.state.epoch,
        r.state.step,
        r.state.samples,
    )


def _fit(r: Run, stop: StopRequest) -> tuple[int, dict]:
    """The training loop; returns an exit code and the last validation metrics."""
    cfg, state = r.cfg.trainer, r.state
    val: dict = {}
    bar = tqdm(
        total=r.total_samples // r.global_batch,
        initial=state.samples // r.global_batch,
        disable=not (r.env.is_main and cfg.progress),
        desc="train",
        dynamic_ncols=True,
        leave=False,
    )
    while not progress.finished(cfg, state):
        r.train_loader.sampler.set_epoch(state.epoch, state.epoch_offset)
        r.net.train()
        started = time.perf_counter()
        for x, y in r.train_loader:
            observe = r.telemetry and (state.step + 1) % cfg.bn_telemetry_every == 0
            if observe:
                r.telemetry.arm()
            lr = optim.lr_at(
                r.cfg.optim,
                state.samples / state.reference_global_batch,
                r.total_samples / state.reference_global_batch,
            )
            optim.set_lr(r.optimizer, lr)
            loss_sum, count, skipped = _train_step(r, x, y)
            state.step += 1
            state.samples += r.global_batch
            state.epoch_offset += r.global_batch
            r.steps.record(state.step, lr, loss_sum, count, skipped)
            bar.update(1)
            last = progress.finished(cfg, state)
            val_now = not last and _every(cfg.eval_every_steps, state.step)
            ckpt_now = not last and _every(cfg.ckpt_every_steps, state.step)
            if last or val_now or ckpt_now or observe or r.steps.full:
                code = _sync(r, stop)  # the only place a training step is read on the host
                if code is not None:
                    state.train_time_s += time.perf_counter() - started
                    return code, val
            if observe:
                _log_telemetry(r)
            if last:
                break
            if val_now:
                val = _evaluate(r)
            if ckpt_now and not _checkpoint(r):
                return exit_codes.NONFINITE, val
            if val_now:
                _keep_best(r, val)
                r.net.train()
        state.train_time_s += time.perf_counter() - started
        left = data.steps_in_epoch(len(r.splits.train), r.global_batch, state.epoch_offset)
        epoch_done = left == 0  # else max_steps was reached mid-epoch
        if epoch_done:
            state.epoch, state.epoch_offset = state.epoch + 1, 0
        last = progress.finished(cfg, state)
        val_now = last or (epoch_done and state.epoch % cfg.eval_every == 0)
        ckpt_now = last or (epoch_done and state.epoch % cfg.ckpt_every == 0)
        if (val_now or ckpt_now) and r.steps.pending:
            code = _sync(r, stop)
            if code is not None:
                return code, val
        if val_now:
            val = _evaluate(r)
            _log_epoch(r, val)
        if ckpt_now and not _checkpoint(r):
            return exit_codes.NONFINITE, val
        if val_now:
            _keep_best(r, val)
    bar.close()
    return exit_codes.OK, val


def _every(interval: int | None, step: int) -> bool:
    return bool(interval) and step % interval == 0


def _train_step(r: Run, x: torch.Tensor, y: torch.Tensor):
    """One optimizer step on this rank's batch; nothing here waits for the device.

    The batch is split into ``trainer.accumulate`` micro-batches, each forward and backward on
    its own (DDP all-reduces the gradients after the last one only), so BN and SyncBN normalize
    over a micro-batch: ``batch_size / accumulate`` samples per rank, times the ranks for SyncBN.
    Returns the step's loss sum and count and (``trainer.nonfinite=skip``: a step with
    non-finite gradients changes nothing, see ``SkipGuard``) whether it was skipped, as device
    values for :class:`StepLog`.
    """
    cfg = r.cfg.trainer
    x, y = _to_device(r.cfg, r.env, x), y.to(r.env.device, non_blocking=True)
    if r.guard is not None:
        r.guard.begin()
    r.optimizer.zero_grad(set_to_none=True)
    k = cfg.accumulate
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=r.env.device), 0
    for i, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
        sync_grads = i == k - 1 or r.ddp is None
        with contextlib.nullcontext() if sync_grads else r.ddp.no_sync():
            with _autocast(r.cfg, r.env):
                loss, n = r.task.loss(r.net(xs), ys)
            (loss / k).backward()
        loss_sum = loss_sum + loss.detach().double() * n
        count = count + n
    norm = None
    if cfg.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.grad_clip)
    skipped = None
    if r.guard is not None:
        skipped = r.guard.step(r.optimizer, norm)
    else:
        r.optimizer.step()
    return loss_sum, count, skipped


def _to_device(cfg, env: DistEnv, x: torch.Tensor) -> torch.Tensor:
    x = x.to(env.device, non_blocking=True)
    if cfg.trainer.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _autocast(cfg, env: DistEnv):
    bf16 = str(cfg.trainer.precision) == "bf16"
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16)


def _forward_precise(cfg, env: DistEnv, model, batch) -> None:
    """PreciseBN's forward: the batch's input on the device, as training runs it."""
    with _autocast(cfg, env):
        model(_to_device(cfg, env, batch[0]))


def _sync(r: Run, stop: StopRequest) -> int | None:
    """Read the steps since the last sync (one all-reduce, one host read) and act on them.

    Records each step's global loss, logs it every ``trainer.log_every`` steps, stops on
    non-finite steps as ``trainer.nonfinite`` says, and, when any rank was asked to stop
    (SIGTERM/SIGUSR1: the flag rides in the same all-reduce), checkpoints and preempts. Returns
    the exit code to stop with, or None to go on. Every rank calls it at the same steps.
    """
    records, stop_all = r.steps.read(r.env.world_size, stop.requested)
    for record in records:
        r.state.train_loss_history.append(record.loss)
        if record.step % r.cfg.trainer.log_every == 0:
            metrics = {"train/loss": record.loss, "train/lr": record.lr, "epoch": r.state.epoch}
            r.logger.log(metrics, step=record.step)
        if record.finite:
            r.skips_in_a_row = 0
            continue
        r.skips_in_a_row += 1
        if not _nonfinite_step_skipped(r, record):
            return exit_codes.NONFINITE
    if stop_all:
        return _preempt(r)
    return None


def _nonfinite_step_skipped(r: Run, record: StepRecord) -> bool:
    """A non-finite step: False to stop the run, True when it was skipped and the run goes on."""
    cfg = r.cfg.trainer
    if cfg.nonfinite == "stop" or r.skips_in_a_row > cfg.max_consecutive_skips:
        r.nonfinite_step = record.step - r.skips_in_a_row + 1
        _report_nonfinite(r, record.loss, r.nonfinite_step)
        return False
    if not record.skipped:  # cannot happen with a NaN loss; an infinite loss, finite gradients
        log.warning("step %d: loss %s with finite gradients: update applied", record.step,
                    record.loss)  # fmt: skip
        return True
    r.state.skipped_steps.append(record.step)
    log.warning(
        "step %d: non-finite loss %s: update skipped (trainer.nonfinite=skip)",
        record.step,
        record.loss,
    )
    return True


def _checkpoint(r: Run) -> bool:
    """Save the training state (rank 0 writes) unless any rank's model holds NaN/Inf.

    Returns False, writing nothing, when the model is not finite: a NaN checkpoint never
    replaces a good one. The all-reduce of that verdict is also the barrier that keeps every
    rank behind a checkpoint it might be resumed from.
    """
    tensors = [t for t in r.model.state_dict().values() if t.is_floating_point()]
    bad = torch.stack([~t.isfinite().all() for t in tensors]).any().float().reshape(1)
    if r.env.world_size > 1:
        dist.all_reduce(bad)
    if bad.item():
        log.error(
            "step %d: the model holds non-finite values: not writing a checkpoint (the last "
            "good one is %s)",
            r.state.step,
            r.ckpts.last if r.ckpts.last.is_file() else "none",
        )
        return False
    r.ckpts.save(_training_state(r))
    if r.env.world_size > 1:
        dist.barrier()
    return True


def _training_state(r: Run) -> dict[str, Any]:
    return {
        "model": r.model.state_dict(),
        "optimizer": r.optimizer.state_dict(),
        "config": r.config,
        "world_size": r.env.world_size,
        **r.state.to_dict(),
    }


def _keep_best(r: Run, val: dict[str, float]) -> None:
    """After an evaluation: if it is the best so far, record it and point best.pt at it."""
    if not r.ckpts.improved(val, r.state.best):
        return
    metric = r.ckpts.best_metric
    r.state.best = {"metric": metric, "value": val[metric], "step": r.state.step}
    r.ckpts.save_best(partial(_training_state, r), r.state.step)


def _preempt(r: Run) -> int:
    """All ranks stop here: checkpoint this step, then exit 75 (the caller flushes W&B)."""
    saved = _checkpoint(r)
    if r.env.is_main:
        log.warning(
            "preempted at step %d (epoch %d, sample %d): %s; relaunch with trainer.resume=auto "
            "to continue",
            r.state.step,
            r.state.epoch,
            r.state.samples,
            f"checkpoint {r.ckpts.last}" if saved else "no checkpoint (non-finite model)",
        )
    return exit_codes.PREEMPTED if saved else exit_codes.NONFINITE


def _report_nonfinite(r: Run, loss: float, step: int) -> None:
    if r.env.is_main:
        cfg = r.cfg.trainer
        why = (
            "trainer.nonfinite=stop"
            if cfg.nonfinite == "stop"
            else f"{r.skips_in_a_row} in a row > trainer.max_consecutive_skips"
        )
        log.error(
            "step %d: non-finite loss %s; stopping (%s) at step %d. The newest checkpoint, %s, "
            "is the last finite state; lower optim.lr, set trainer.grad_clip, or "
            "trainer.nonfinite=skip",
            step,
            loss,
            why,
            r.state.step,
            r.ckpts.last if r.ckpts.last.is_file() else "none yet",
        )


def _telemetry(cfg, model) -> BNTelemetry | None:
    if not cfg.trainer.bn_telemetry_every:
        return None
    telemetry = BNTelemetry(model)
    if not telemetry.layers:
        log.warning("trainer.bn_telemetry_every: no SyncBatchNorm layer to observe (norm=syncbn)")
        return None
    if cfg.trainer.compile:
        log.warning("trainer.bn_telemetry_every: layers inside torch.compile are not recorded")
    return telemetry


def _log_telemetry(r: Run) -> None:
    metrics = r.telemetry.collect()  # a collective: every rank, the same steps
    if not metrics:
        return
    r.state.bn_telemetry.append({"step": r.state.step, **metrics})
    r.logger.log(metrics, step=r.state.step)
    if r.env.is_main:
        log.info("step %d: %s", r.state.step, r.telemetry.summary(metrics))


def _evaluate(r: Run) -> dict:
    """Evaluate, record the point in the run's validation history, log it.

    With PreciseBN (``r.precise``), evaluates twice: with the running averages as they are
    (``<metric>_ema``), then with the statistics ``precise()`` sets.
    """
    extra = {}
    if r.precise is not None:
        ema = evaluate(r.net, r.val_loader, r.env, r.task, r.cfg)
        extra = {f"{k}_ema": v for k, v in _scalars(ema).items()}
        r.precise()
    val = evaluate(r.net, r.val_loader, r.env, r.task, r.cfg) | extra
    r.state.val_history.append({"step": r.state.step, **_scalars(val)})
    r.logger.log({f"val/{k}": v for k, v in _scalars(val).items()} | {"epoch": r.state.epoch},
                 r.state.step)  # fmt: skip
    return val


def _scalars(metrics: dict) -> dict[str, float]:
    """The metrics that are one number (not the count, not per-class lists)."""
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def _log_epoch(r: Run, val: dict) -> None:
    if r.env.is_main:
        primary = f"{r.task.primary}_ema"
        log.info(
            "epoch %d step %d: train_loss %.4f val_loss %.4f %s%s",
            r.state.epoch,
            r.state.step,
            r.state.train_loss_history[-1] if r.state.train_loss_history else math.nan,
            val["loss"],
            r.task.describe(val),
            f" (with EMA statistics {r.task.primary} {val[primary]:.4f})" if primary in val else "",
        )


@torch.no_grad()
def evaluate(net, loader, env: DistEnv, task: tasks.Task, cfg=None) -> dict:
    """The task's metrics over the whole split ``loader`` shards: every sample counted once."""
    net.eval()
    meter = task.meter(env.device)
    for x, y in loader:
        x = _to_device(cfg, env, x) if cfg is not None else x.to(env.device)
        y = y.to(env.device, non_blocking=True)
        with _autocast(cfg, env) if cfg is not None else contextlib.nullcontext():
            output = net(x)
        meter.update(output, y)
    return meter.compute(env.world_size)


def _finish(r: Run, val: dict) -> dict:
    """After the last step: final metrics on every rank, metrics.json on rank 0."""
    if not val:  # resumed after the last step: evaluate what was trained
        val = _evaluate(r)
    metrics = _metrics(r, val)
    if r.cfg.trainer.eval_train:  # un-augmented, every training sample once
        loader = _loaders(r.cfg, r.env, r.splits.train_eval, r.cfg.trainer.eval_batch_size)
        train = evaluate(r.net, loader, r.env, r.task, r.cfg)
        metrics |= {f"train_{k}": v for k, v in _scalars(train).items()}
    if r.env.is_main:
        _write_json(r.run_dir / "metrics.json", metrics)
    r.logger.log({f"final/val_{k}": v for k, v in _scalars(val).items()}, r.state.step)
    return metrics


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader (or a kill mid-write) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _metrics(r: Run, val: dict) -> dict:
    s = r.state
    return {
        **{f"val_{k}": v for k, v in val.items()},
        "task": r.task.name,
        "steps": s.step,
        "epochs": s.epoch,
        "samples": s.samples,
        "world_size": r.env.world_size,
        "global_batch": r.global_batch,
        "norm": str(r.cfg.norm.name),
        "lr": r.optimizer.param_groups[0]["lr"],
        "samples_per_s": s.samples / max(s.train_time_s, 1e-9),
        "wall_time_s": s.train_time_s,
        "train_loss_history": s.train_loss_history,
        "skipped_steps": s.skipped_steps,
        "best": s.best,
        "val_history": s.val_history,
        "bn_telemetry": s.bn_telemetry,
    }


def _evaluate_checkpoint(cfg, env: DistEnv) -> RunResult:
    """``trainer.eval_only``: evaluate a checkpoint on the validation split, on all ranks."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint.resolve(cfg.trainer.resume, run_dir)
    if path is None:
        raise ConfigError(
            f"trainer.eval_only=true expected a checkpoint (got trainer.resume={cfg.trainer.resume}"
            f" and no {run_dir / 'checkpoints' / checkpoint.LAST}); pass trainer.resume=PATH"
        )
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    saved = checkpoint.load(path, map_location=env.device)
    resume_policy.check(path, saved.get("config"), config, eval_only=True)
    splits = data.load(cfg.data, augment=False)
    task = tasks.build(cfg.task, splits)
    model = _model(cfg, splits, env)
    model.load_state_dict(saved["model"])
    loader = _loaders(cfg, env, splits.val, cfg.trainer.eval_batch_size)
    val = evaluate(model, loader, env, task, cfg)  # SyncBN in eval mode: no collective
    metrics = {
        **{f"val_{k}": v for k, v in val.items()},
        "checkpoint": str(path),
        "step": saved["step"],
        "epoch": saved["epoch"],
        "world_size": env.world_size,
        "eval_only": True,
    }
    if env.is_main:
        _write_json(run_dir / "metrics.json", metrics)
        log.info(
            "evaluated %s (step %d) on %d ranks: val_loss %.4f %s over %d samples",
            path,
            saved["step"],
            env.world_size,
            val["loss"],
            task.describe(val),
            val["count"],
        )
    return RunResult(exit_codes.OK, metrics, metrics.get(f"val_{task.primary}"))
