"""Evaluation: exact metrics over a sharded split (every sample counted once, on all ranks), a
training run's evaluations (with PreciseBN), and ``trainer.eval_only`` (a checkpoint's metrics)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import data, report, tasks
from .errors import ConfigError
from .lifecycle import exit_codes
from .lifecycle.env import DistEnv
from .parts import Run, autocast, eval_loader, model_on_device, to_device
from .report import RunResult
from .state import checkpoint, resume_policy

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(net, loader, env: DistEnv, task: tasks.Task, cfg=None) -> dict:
    """The task's metrics over the whole split ``loader`` shards: every sample counted once."""
    net.eval()
    meter = task.meter(env.device)
    for x, y in loader:
        x = to_device(cfg, env, x) if cfg is not None else x.to(env.device)
        y = y.to(env.device, non_blocking=True)
        with autocast(cfg, env) if cfg is not None else contextlib.nullcontext():
            output = net(x)
        meter.update(output, y)
    return meter.compute(env.world_size)


def evaluate_run(run: Run) -> dict:
    """Evaluate a training run on the validation split and record the point (report.validation).

    With PreciseBN (``parts.precise``), evaluates twice: with the running averages as they are
    (``<metric>_ema``), then with the statistics ``precise()`` sets.
    """
    parts = run.parts
    extra = {}
    if parts.precise is not None:
        ema = evaluate(parts.net, parts.val_loader, parts.env, parts.task, parts.cfg)
        extra = {f"{k}_ema": v for k, v in report.scalars(ema).items()}
        parts.precise()
    val = evaluate(parts.net, parts.val_loader, parts.env, parts.task, parts.cfg) | extra
    report.validation(run, val)
    return val


def evaluate_train_split(run: Run) -> dict:
    """``trainer.eval_train``: the metrics on the un-augmented training split, every sample once."""
    parts = run.parts
    loader = eval_loader(parts.cfg, parts.env, parts.splits.train_eval)
    return evaluate(parts.net, loader, parts.env, parts.task, parts.cfg)


def eval_only(cfg, env: DistEnv) -> RunResult:
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
    model = model_on_device(cfg, splits, env)
    checkpoint.check_fits(path, model, saved["model"])
    model.load_state_dict(saved["model"])
    loader = eval_loader(cfg, env, splits.val)
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
        report.write_json(run_dir / "metrics.json", metrics)
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
