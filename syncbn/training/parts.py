"""What one run is made of, and where it stands.

:class:`Parts` are built once (:func:`build`) from the config and never reassigned: data, task,
model, optimizer, loaders, checkpoint keeper. :class:`Run` adds what changes as the run goes: its
progress (:class:`~syncbn.training.state.progress.RunState`, what a checkpoint carries), the
losses not read yet, the non-finite streak. The model and the loaders are also what eval-only
(:mod:`syncbn.training.evaluate`) builds, so they live here rather than in the loop.

Names: ``cfg`` is always the root config; its groups are ``cfg.trainer``, ``cfg.norm``, ... (a
local ``trainer = cfg.trainer`` where a function reads many of its keys).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..precise_bn import precise_bn
from ..telemetry import BNTelemetry
from . import data, optim, tasks
from .errors import ConfigError
from .lifecycle.env import DistEnv
from .models import build_model, count_norm_layers
from .nonfinite import SkipGuard
from .state.manager import CheckpointManager
from .state.progress import RunState
from .steplog import StepLog
from .wandb_logger import WandbLogger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parts:
    """The parts of one training run, built once by :func:`build`."""

    cfg: Any  # the root config
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
    guard: SkipGuard | None  # trainer.nonfinite=skip
    precise: Any  # () -> None: re-estimates the BN statistics before an evaluation, or None
    telemetry: BNTelemetry | None

    @property
    def global_batch(self) -> int:
        return self.cfg.trainer.batch_size * self.env.world_size


@dataclass
class Run:
    """A run in progress: its parts and what changes as it trains."""

    parts: Parts
    state: RunState  # progress in samples, histories, best: what a checkpoint carries
    steps: StepLog  # losses of the steps since the last sync, on the device
    logger: WandbLogger
    total_samples: int  # the run's plan, from the (resumed) state on
    skips_in_a_row: int = 0  # trainer.nonfinite=skip: non-finite steps in a row
    nonfinite_step: int | None = None  # the first non-finite step, when the run stops on one


def build(cfg, env: DistEnv) -> Parts:
    trainer = cfg.trainer
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.manual_seed(cfg.seed)  # same model initialization on every rank
    splits = data.load(cfg.data, cfg.seed, bool(trainer.augment))
    if env.world_size * trainer.batch_size > len(splits.train):
        raise ConfigError(
            f"trainer.batch_size x world size = {trainer.batch_size} x {env.world_size} "
            f"expected at most the {len(splits.train)} training samples; use fewer ranks or a "
            f"smaller batch_size"
        )
    task = tasks.build(cfg.task, splits)
    model = model_on_device(cfg, splits, env)
    net, ddp = model, None
    if env.world_size > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        net = ddp = DistributedDataParallel(model, device_ids=device_ids)
    if trainer.compile:
        net = torch.compile(net)
    optimizer = optim.build(cfg.optim, model)
    precise = None
    if trainer.precise_bn_batches:
        train_eval = eval_loader(cfg, env, splits.train_eval)
        precise = partial(precise_bn, model, train_eval, trainer.precise_bn_batches,
                          forward=partial(_forward_precise, cfg, env))  # fmt: skip
    return Parts(
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
            splits.train,
            trainer.batch_size,
            env.rank,
            env.world_size,
            cfg.seed,
            cfg.loader,
            env.device,
        ),  # fmt: skip
        val_loader=eval_loader(cfg, env, splits.val),
        ckpts=CheckpointManager(
            run_dir / "checkpoints", trainer.keep_last, trainer.best_metric, env.is_main
        ),
        guard=SkipGuard(model, optimizer) if trainer.nonfinite == "skip" else None,
        precise=precise,
        telemetry=_telemetry(cfg, model),
    )


def eval_loader(cfg, env: DistEnv, dataset) -> DataLoader:
    """This rank's shard of ``dataset``, ``trainer.eval_batch_size`` a batch: every sample once."""
    return data.eval_loader(dataset, cfg.trainer.eval_batch_size, env.rank, env.world_size,
                            cfg.loader, env.device)  # fmt: skip


def model_on_device(cfg, splits: data.Splits, env: DistEnv) -> torch.nn.Module:
    """The configured model on the run's device, checked against the batch it will train on."""
    trainer, norm = cfg.trainer, cfg.norm
    model = build_model(
        cfg.model,
        str(norm.name),
        splits.in_channels,
        splits.num_classes,
        norm.group_size,
        debug=norm.debug,
        check_finite=norm.check_finite,
    )
    if str(norm.name) != "none" and not count_norm_layers(model):
        log.warning("norm=%s: the model has no BatchNorm layer to use it", norm.name)
    check = getattr(model, "check_batch", None)
    if check is not None and not trainer.eval_only:
        micro_batch = trainer.batch_size // trainer.accumulate
        problem = check(micro_batch)
        if problem:
            raise ConfigError(
                f"{type(model).__name__} with norm={norm.name} expected more than "
                f"{micro_batch} image per rank and micro-batch (got trainer.batch_size="
                f"{trainer.batch_size}, trainer.accumulate={trainer.accumulate}): {problem}"
            )
    model = model.to(env.device)
    if trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(cfg, env: DistEnv, x: torch.Tensor) -> torch.Tensor:
    """An input batch on the run's device, in the model's memory format."""
    x = x.to(env.device, non_blocking=True)
    if cfg.trainer.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(cfg, env: DistEnv):
    """The context a forward runs in: bfloat16 autocast with ``trainer.precision=bf16``."""
    bf16 = str(cfg.trainer.precision) == "bf16"
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16)


def _forward_precise(cfg, env: DistEnv, model, batch) -> None:
    """PreciseBN's forward: the batch's input on the device, as training runs it."""
    with autocast(cfg, env):
        model(to_device(cfg, env, batch[0]))


def _telemetry(cfg, model) -> BNTelemetry | None:
    trainer = cfg.trainer
    if not trainer.bn_telemetry_every:
        return None
    telemetry = BNTelemetry(model)
    if not telemetry.layers:
        log.warning("trainer.bn_telemetry_every: no SyncBatchNorm layer to observe (norm=syncbn)")
        return None
    if trainer.compile:
        log.warning("trainer.bn_telemetry_every: layers inside torch.compile are not recorded")
    return telemetry
