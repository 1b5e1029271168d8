"""What train.py runs: set up, train with DDP, evaluate exactly, checkpoint, log, write metrics.

Read top to bottom: :func:`run` validates and joins the process group; :func:`_train` builds the
run's parts (:class:`Run`), resumes if there is a checkpoint, and drives :func:`_fit`, the loop
over steps; each step is :func:`_train_step`. Signals, checkpoint files, the resume policy,
progress in samples, the schedule and W&B live in their own modules.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..precise_bn import precise_bn
from ..telemetry import BNTelemetry
from . import checkpoint, data, exit_codes, optim, progress, resume_policy
from .checkpoint_manager import CheckpointManager
from .config_checks import ConfigError, validate
from .env import DistEnv, setup, teardown
from .models import build_model
from .orphan import under_torchrun, watch_parent
from .preemption import StopRequest
from .progress import RunState
from .wandb_logger import WandbLogger

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    exit_code: int  # syncbn.training.exit_codes
    metrics: dict = field(default_factory=dict)  # what rank 0 wrote to metrics.json


@dataclass
class Run:
    """The parts of one training run, built once by :func:`_train`."""

    cfg: Any
    env: DistEnv
    run_dir: Path
    config: dict  # cfg resolved to plain containers: config.yaml, checkpoints, W&B
    splits: data.Splits
    model: torch.nn.Module  # what the checkpoints hold
    net: torch.nn.Module  # what runs: model, wrapped in DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ckpts: CheckpointManager
    state: RunState
    precise: Callable[[], None] | None  # re-estimates the BN statistics before an evaluation
    telemetry: BNTelemetry | None
    logger: WandbLogger | None = None
    total_samples: int = 0  # the run's plan, from the current state on

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
    env = setup(str(cfg.dist.backend), cfg.dist.timeout_s)
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
            exit_codes.write_status(
                r.run_dir, code, step=r.state.step, samples=r.state.samples, epoch=r.state.epoch,
                checkpoint=str(r.ckpts.last) if r.ckpts.last.is_file() else None,
            )  # fmt: skip
    return RunResult(code, metrics)


def _build(cfg, env: DistEnv) -> Run:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.manual_seed(cfg.seed)  # same model initialization on every rank
    splits = data.load(cfg.data)
    if env.world_size * cfg.trainer.batch_size > len(splits.train):
        raise ConfigError(
            f"trainer.batch_size x world size = {cfg.trainer.batch_size} x {env.world_size} "
            f"expected at most the {len(splits.train)} training samples; use fewer ranks or a "
            f"smaller batch_size"
        )
    model = _model(cfg, splits).to(env.device)
    net = model
    if env.world_size > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.trainer.compile:
        net = torch.compile(net)
    precise = None
    if cfg.trainer.precise_bn_batches:
        loader = data.eval_loader(splits.train, cfg.trainer.batch_size, env.rank, env.world_size)
        precise = partial(precise_bn, model, loader, cfg.trainer.precise_bn_batches)
    amp = bool(cfg.trainer.amp) and env.device.type == "cuda"
    ckpts = CheckpointManager(
        run_dir / "checkpoints", cfg.trainer.keep_last, cfg.trainer.best_metric, env.is_main
    )
    return Run(
        cfg=cfg,
        env=env,
        run_dir=run_dir,
        config=config,
        splits=splits,
        model=model,
        net=net,
        optimizer=optim.build(cfg.optim, model),
        scaler=torch.amp.GradScaler("cuda", enabled=amp),
        ckpts=ckpts,
        state=RunState(reference_global_batch=cfg.trainer.batch_size * env.world_size),
        precise=precise,
        telemetry=_telemetry(cfg, model),
    )


def _model(cfg, splits: data.Splits) -> torch.nn.Module:
    return build_model(
        cfg.model,
        str(cfg.norm.name),
        splits.in_channels,
        splits.num_classes,
        cfg.norm.group_size,
        debug=cfg.norm.debug,
        check_finite=cfg.norm.check_finite,
    )


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
    if "scaler" in saved:
        r.scaler.load_state_dict(saved["scaler"])
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
    skips_in_a_row = 0
    bar = tqdm(
        total=r.total_samples // r.global_batch,
        initial=state.samples // r.global_batch,
        disable=not (r.env.is_main and cfg.progress),
        desc="train",
        dynamic_ncols=True,
        leave=False,
    )
    while not progress.finished(cfg, state):
        loader = data.train_loader(
            r.splits.train, cfg.batch_size, r.env.rank, r.env.world_size, r.cfg.seed,
            state.epoch, state.epoch_offset,
        )  # fmt: skip
        r.net.train()
        started = time.perf_counter()
        for x, y in loader:
            observe = r.telemetry and (state.step + 1) % cfg.bn_telemetry_every == 0
            if observe:
                r.telemetry.arm()
            lr = optim.lr_at(
                r.cfg.optim,
                state.samples / state.reference_global_batch,
                r.total_samples / state.reference_global_batch,
            )
            optim.set_lr(r.optimizer, lr)
            loss, stop_all = _train_step(r, x, y, stop.requested)
            state.step += 1
            state.samples += r.global_batch
            state.epoch_offset += r.global_batch
            state.train_loss_history.append(loss)
            bar.update(1)
            if math.isfinite(loss):
                skips_in_a_row = 0
            else:
                skips_in_a_row += 1
                if cfg.nonfinite == "stop" or skips_in_a_row > cfg.max_consecutive_skips:
                    _report_nonfinite(r, loss, skips_in_a_row)
                    return exit_codes.NONFINITE, val
                state.skipped_steps.append(state.step)
                log.warning(
                    "step %d: non-finite loss %s: update skipped (trainer.nonfinite=skip)",
                    state.step,
                    loss,
                )
            if observe:
                _log_telemetry(r)
            if state.step % cfg.log_every == 0:
                r.logger.log(
                    {"train/loss": loss, "train/lr": lr, "epoch": state.epoch}, step=state.step
                )
            if stop_all:  # some rank got SIGTERM/SIGUSR1; all ranks know it from this step's sum
                state.train_time_s += time.perf_counter() - started
                return _preempt(r), val
            last = progress.finished(cfg, state)
            if last:
                break
            every = cfg.eval_every_steps
            val_now = bool(every) and state.step % every == 0
            if val_now:
                val = _evaluate(r)
            if cfg.ckpt_every_steps and state.step % cfg.ckpt_every_steps == 0:
                if not _checkpoint(r):
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
        if val_now:
            val = _evaluate(r)
            _log_epoch(r, val)
        if last or (epoch_done and state.epoch % cfg.ckpt_every == 0):
            if not _checkpoint(r):
                return exit_codes.NONFINITE, val
        if val_now:
            _keep_best(r, val)
    bar.close()
    return exit_codes.OK, val


def _train_step(r: Run, x, y, stop_requested: bool) -> tuple[float, bool]:
    """One optimizer step. Returns the *global*-batch mean loss and whether any rank must stop.

    The loss is all-reduced before the update, with this rank's stop flag as a third value: the
    ranks agree on a stop at this step boundary at no extra cost (the loss sum was reduced
    every step anyway). A non-finite loss leaves weights, optimizer state and BN statistics
    as they were (the caller stops or skips).
    """
    cfg, env = r.cfg.trainer, r.env
    x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
    if cfg.augment:
        x = data.augment(x, r.cfg.data.augment_shift, r.cfg.data.augment_flip, _augment_rng(r))
    buffers = [b.clone() for b in r.model.buffers()] if cfg.nonfinite == "skip" else None
    with torch.autocast(env.device.type, enabled=r.scaler.is_enabled()):
        loss = F.cross_entropy(r.net(x), y)
    r.optimizer.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()
    # (loss sum, count, stop flag) -> summed over ranks: (global sum, global count, stops)
    one = torch.ones((), device=x.device)
    summed = torch.stack([loss.detach().float() * len(y), one * len(y), one * stop_requested])
    if env.world_size > 1:
        dist.all_reduce(summed)
    total, count, stops = summed.tolist()
    mean = total / count
    if math.isfinite(mean):
        if cfg.grad_clip:
            r.scaler.unscale_(r.optimizer)
            torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.grad_clip)
        r.scaler.step(r.optimizer)
        r.scaler.update()
    else:
        r.optimizer.zero_grad(set_to_none=True)
        if buffers is not None:  # this forward's NaN statistics must not stay in running_mean
            with torch.no_grad():
                for b, saved in zip(r.model.buffers(), buffers, strict=True):
                    b.copy_(saved)
    return mean, stops > 0


def _augment_rng(r: Run) -> torch.Generator:
    """A generator seeded by (seed, epoch, sample offset, rank): a resumed run, even one resumed
    mid-epoch, draws exactly the augmentation an uninterrupted one draws."""
    s = r.state
    key = ((r.cfg.seed * 1_000_003 + s.epoch) * 1_000_003 + s.epoch_offset) * 1_009 + r.env.rank
    return torch.Generator().manual_seed(key % (2**63))


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
        "scaler": r.scaler.state_dict(),
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


def _report_nonfinite(r: Run, loss: float, in_a_row: int) -> None:
    if r.env.is_main:
        why = (
            "trainer.nonfinite=stop"
            if r.cfg.trainer.nonfinite == "stop"
            else f"{in_a_row} in a row > trainer.max_consecutive_skips"
        )
        log.error(
            "step %d: non-finite loss %s; stopping (%s). The newest checkpoint, %s, is the last "
            "finite state; lower optim.lr, set trainer.grad_clip, or trainer.nonfinite=skip",
            r.state.step,
            loss,
            why,
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


def _evaluate(r: Run) -> dict[str, float]:
    """Evaluate, record the point in the run's validation history, log it.

    With PreciseBN (``r.precise``), evaluates twice: with the running averages as they are
    (``acc_ema``, ``loss_ema``), then with the statistics ``precise()`` sets (``acc``, ``loss``).
    """
    extra = {}
    val_loader = data.eval_loader(
        r.splits.val, r.cfg.trainer.batch_size, r.env.rank, r.env.world_size
    )
    if r.precise is not None:
        ema = evaluate(r.net, val_loader, r.env)
        extra = {"acc_ema": ema["acc"], "loss_ema": ema["loss"]}
        r.precise()
    val = evaluate(r.net, val_loader, r.env) | extra
    point = {"step": r.state.step, "loss": val["loss"], "acc": val["acc"], **extra}
    r.state.val_history.append(point)
    r.logger.log({f"val/{k}": v for k, v in val.items()} | {"epoch": r.state.epoch}, r.state.step)
    return val


def _log_epoch(r: Run, val: dict[str, float]) -> None:
    if r.env.is_main:
        log.info(
            "epoch %d step %d: train_loss %.4f val_loss %.4f val_acc %.4f%s",
            r.state.epoch,
            r.state.step,
            r.state.train_loss_history[-1] if r.state.train_loss_history else math.nan,
            val["loss"],
            val["acc"],
            f" (with EMA statistics {val['acc_ema']:.4f})" if "acc_ema" in val else "",
        )


@torch.no_grad()
def evaluate(net, loader, env: DistEnv) -> dict[str, float]:
    """Loss and accuracy over the whole validation set: every sample counted exactly once."""
    net.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, count
    for x, y in loader:
        x, y = x.to(env.device), y.to(env.device)
        logits = net(x)
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    if env.world_size > 1:
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return {"loss": loss / count, "acc": correct / count, "count": int(count)}


def _finish(r: Run, val: dict) -> dict:
    """After the last step: final metrics on every rank, metrics.json on rank 0."""
    if not val:  # resumed after the last step: evaluate what was trained
        val = _evaluate(r)
    metrics = _metrics(r, val)
    if r.cfg.trainer.eval_train:  # un-augmented, every training sample once
        loader = data.eval_loader(
            r.splits.train, r.cfg.trainer.batch_size, r.env.rank, r.env.world_size
        )
        train = evaluate(r.net, loader, r.env)
        metrics |= {"train_acc": train["acc"], "train_loss": train["loss"]}
    if r.env.is_main:
        _write_json(r.run_dir / "metrics.json", metrics)
    r.logger.log({"final/val_acc": val["acc"], "final/val_loss": val["loss"]}, r.state.step)
    return metrics


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader (or a kill mid-write) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _metrics(r: Run, val: dict) -> dict:
    s = r.state
    ema = {f"val_{k}": val[k] for k in ("acc_ema", "loss_ema") if k in val}
    return {
        "val_acc": val["acc"],
        "val_loss": val["loss"],
        **ema,
        "val_count": val["count"],
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
    splits = data.load(cfg.data)
    model = _model(cfg, splits).to(env.device)
    model.load_state_dict(saved["model"])
    loader = data.eval_loader(splits.val, cfg.trainer.batch_size, env.rank, env.world_size)
    val = evaluate(model, loader, env)  # SyncBN in eval mode: running statistics, no collective
    metrics = {
        "val_acc": val["acc"],
        "val_loss": val["loss"],
        "val_count": val["count"],
        "checkpoint": str(path),
        "step": saved["step"],
        "epoch": saved["epoch"],
        "world_size": env.world_size,
        "eval_only": True,
    }
    if env.is_main:
        _write_json(run_dir / "metrics.json", metrics)
        log.info(
            "evaluated %s (step %d) on %d ranks: val_acc %.4f val_loss %.4f over %d samples",
            path,
            saved["step"],
            env.world_size,
            val["acc"],
            val["loss"],
            val["count"],
        )
    return RunResult(exit_codes.OK, metrics)
