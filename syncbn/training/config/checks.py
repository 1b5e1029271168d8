"""Reject bad configuration before any work starts, naming each bad key and the fix.

Types and choices are Hydra's job (:mod:`syncbn.training.config.schema`): ``optim.lr=abc`` never
gets here. This module checks what types cannot say: ranges (``optim.lr`` finite and > 0,
``data.val_fraction`` in (0, 1)), and facts about this machine and launch (``dist.backend=nccl``
needs CUDA, ``norm.group_size`` must divide the world size). Every failed check is collected, so a
config with three bad values fails once, with one message listing all three.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ...distributed import divisors
from ..errors import ConfigError
from ..lifecycle.env import world_size_from_env
from ..tasks import TASKS
from .schema import (
    POSITIVE,
    POSITIVE_OR_NULL,
    SECONDS,
    DistConfig,
    LoaderConfig,
    LoggerConfig,
    TrainerConfig,
)


def validate(cfg, world_size: int | None = None, cuda: bool | None = None) -> None:
    """Raise :class:`ConfigError` listing every bad value of ``cfg`` (None: all good).

    ``world_size`` and ``cuda`` default to the launch's (``WORLD_SIZE`` or ``SLURM_NTASKS``) and
    this machine's (``torch.cuda.is_available()``).
    """
    world_size = world_size_from_env() if world_size is None else world_size
    cuda = torch.cuda.is_available() if cuda is None else cuda
    problems = [
        *_trainer(cfg.trainer),
        *_optim(cfg.optim),
        *_data(cfg.data),
        *_model(cfg.model),
        *_task(cfg),
        *_loader(cfg.loader),
        *_dist_and_logger(cfg, world_size, cuda),
    ]
    if problems:
        raise ConfigError(format_problems(problems))


def format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"bad configuration: {problems[0]}"
    return "bad configuration:\n" + "\n".join(f"  - {p}" for p in problems)


def _trainer(trainer) -> Iterator[str]:
    if trainer.max_steps is None:
        if not _positive_int(trainer.epochs):
            yield f"trainer.epochs expected > 0 (got {trainer.epochs}); or set trainer.max_steps"
    elif not _positive_int(trainer.max_steps):
        yield (
            f"trainer.max_steps expected > 0 or null (got {trainer.max_steps}); null trains "
            f"trainer.epochs={trainer.epochs} epochs"
        )
    yield from _ranged("trainer", TrainerConfig, trainer)
    if (
        _positive_int(trainer.batch_size)
        and _positive_int(trainer.accumulate)
        and trainer.batch_size % trainer.accumulate
    ):
        yield (
            f"trainer.accumulate expected a divisor of trainer.batch_size={trainer.batch_size} "
            f"(got {trainer.accumulate}): each rank's batch is split into that many equal "
            f"micro-batches"
        )
    if trainer.grad_clip is not None and not _positive_finite(trainer.grad_clip):
        yield (
            f"trainer.grad_clip expected a finite max norm > 0 or null (got "
            f"{trainer.grad_clip}); null turns clipping off"
        )
    resume = trainer.resume
    if resume not in (None, "", "auto") and not Path(resume).is_file():
        yield f"trainer.resume expected a checkpoint file, 'auto' or null (got {resume!r}: missing)"
    if trainer.eval_only and not resume:
        yield (
            "trainer.eval_only=true expected a checkpoint to evaluate (got trainer.resume=null); "
            "pass trainer.resume=PATH/TO/checkpoint.pt"
        )


def _optim(optim) -> Iterator[str]:
    if not _positive_finite(optim.lr):
        yield f"optim.lr expected a finite number > 0 (got {optim.lr})"
    if not (_finite(optim.weight_decay) and optim.weight_decay >= 0):
        yield f"optim.weight_decay expected a finite number >= 0 (got {optim.weight_decay})"
    if not (_finite(optim.momentum) and 0 <= optim.momentum < 1):
        yield f"optim.momentum expected a number in [0, 1) (got {optim.momentum})"
    if len(optim.betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in optim.betas):
        yield f"optim.betas expected two numbers in [0, 1) (got {list(optim.betas)})"
    if not (isinstance(optim.warmup_steps, int) and optim.warmup_steps >= 0):
        yield f"optim.warmup_steps expected >= 0 (got {optim.warmup_steps})"
    if not (_finite(optim.min_lr_ratio) and 0 <= optim.min_lr_ratio <= 1):
        yield f"optim.min_lr_ratio expected a number in [0, 1] (got {optim.min_lr_ratio})"


def _data(data) -> Iterator[str]:
    if "val_fraction" in data and not (_finite(data.val_fraction) and 0 < data.val_fraction < 1):
        yield (
            f"data.val_fraction expected a fraction in (0, 1) (got {data.val_fraction}): the "
            f"validation split must hold samples and so must the training split"
        )
    if "augment_shift" in data and data.augment_shift < 0:
        yield f"data.augment_shift expected >= 0 pixels (got {data.augment_shift})"
    for key in ("num_samples", "image_size", "channels", "canvas", "num_train", "num_val"):
        if key in data and not _positive_int(data[key]):
            yield f"data.{key} expected > 0 (got {data[key]})"
    if "num_classes" in data and not (isinstance(data.num_classes, int) and data.num_classes >= 2):
        yield f"data.num_classes expected >= 2 (got {data.num_classes})"
    if "pad" in data and data.pad < 0:
        yield f"data.pad expected >= 0 pixels (got {data.pad})"
    for key in ("scale", "ratio", "digits_per_image", "digit_scale", "rim"):
        if key in data and not _increasing_pair(data[key]):
            yield f"data.{key} expected [low, high] with 0 < low <= high (got {list(data[key])})"
    if "scale" in data and _increasing_pair(data.scale) and data.scale[1] > 1:
        yield f"data.scale expected area fractions in (0, 1] (got {list(data.scale)})"
    if "canvas" in data and "digit_scale" in data and _increasing_pair(data.digit_scale):
        if _positive_int(data.canvas) and 8 * data.digit_scale[1] > data.canvas:
            yield (
                f"data.digit_scale expected digits (8 x scale pixels) that fit the "
                f"{data.canvas}-pixel canvas (got {list(data.digit_scale)})"
            )
    if "resize_ratio" in data and not (_finite(data.resize_ratio) and 0 < data.resize_ratio <= 1):
        yield f"data.resize_ratio expected a number in (0, 1] (got {data.resize_ratio})"
    for key in ("mean", "std"):
        if key in data and (len(data[key]) != 3 or not all(_finite(v) for v in data[key])):
            yield f"data.{key} expected 3 numbers, one per RGB channel (got {list(data[key])})"
    if "std" in data and not all(_positive_finite(v) for v in data.std):
        yield f"data.std expected numbers > 0 (got {list(data.std)})"


def _model(model) -> Iterator[str]:
    if "_target_" not in model or OmegaConf.is_missing(model, "_target_") or not model._target_:
        yield (
            "model._target_ expected the import path of a class or function returning an "
            "nn.Module (got none); e.g. model._target_=torchvision.models.resnet50"
        )
    if "widths" in model and (
        len(model.widths) == 0 or not all(_positive_int(w) for w in model.widths)
    ):
        yield (
            f"model.widths expected a non-empty list of channel counts > 0 (got "
            f"{list(model.widths)})"
        )
    if "blocks_per_stage" in model and not _positive_int(model.blocks_per_stage):
        yield f"model.blocks_per_stage expected > 0 (got {model.blocks_per_stage})"
    if "init_scale" in model and not _positive_finite(model.init_scale):
        yield f"model.init_scale expected a finite number > 0 (got {model.init_scale})"


def _task(cfg) -> Iterator[str]:
    task = TASKS.get(str(cfg.task.name))
    data = str(cfg.data.name)
    if task is not None and data not in task.datasets:
        yield (
            f"task={cfg.task.name} expected data from {list(task.datasets)} (got data={data}); "
            f"choose one of those, or the task that reads {data}"
        )
    smoothing = cfg.task.label_smoothing
    if not (_finite(smoothing) and 0 <= smoothing < 1):
        yield f"task.label_smoothing expected a number in [0, 1) (got {smoothing})"
    if "ignore_index" in cfg.data and cfg.data.ignore_index != cfg.task.ignore_index:
        yield (
            f"task.ignore_index expected data.ignore_index={cfg.data.ignore_index}, the label "
            f"the data gives unlabelled pixels (got {cfg.task.ignore_index})"
        )


def _loader(loader) -> Iterator[str]:
    if not (isinstance(loader.workers, int) and loader.workers >= 0):
        yield f"loader.workers expected >= 0 (got {loader.workers}); 0 loads in the main process"
    yield from _ranged("loader", LoaderConfig, loader)


def _dist_and_logger(cfg, world_size: int, cuda: bool) -> Iterator[str]:
    dist, logger = cfg.dist, cfg.logger
    yield from _ranged("dist", DistConfig, dist)
    yield from _ranged("logger", LoggerConfig, logger)
    init = dist.init_method
    if init is not None and not str(init).startswith(("file://", "tcp://", "env://")):
        yield (
            f"dist.init_method expected null, file:///path, tcp://host:port or env:// (got "
            f"{init!r})"
        )
    if dist.backend == "nccl" and not cuda:
        yield (
            "dist.backend=nccl expected CUDA GPUs (got torch.cuda.is_available() == False); "
            "use dist.backend=auto or dist.backend=gloo on CPU"
        )
    if (
        logger.mode == "online"
        and _positive_finite(logger.init_timeout_s)
        and world_size > 1
        and _positive_finite(dist.timeout_s)
        and logger.init_timeout_s >= dist.timeout_s
    ):
        yield (
            f"logger.init_timeout_s expected less than dist.timeout_s (got {logger.init_timeout_s} "
            f">= {dist.timeout_s}): the other ranks wait for rank 0's W&B start that long"
        )
    group_size = cfg.norm.group_size
    if group_size is not None and not (_positive_int(group_size) and world_size % group_size == 0):
        yield (
            f"norm.group_size expected a divisor of the world size {world_size} (got {group_size});"
            f" choose one of {divisors(world_size)} or null"
        )


def _ranged(group: str, schema, node) -> Iterator[str]:
    """The keys whose range the schema states (:func:`~.schema.key`), checked from it alone."""
    for f in fields(schema):
        bound, value, name = f.metadata.get("range"), node[f.name], f"{group}.{f.name}"
        at_most, at_least = f.metadata.get("at_most"), f.metadata.get("at_least")
        if bound == SECONDS:
            if not _positive_finite(value):
                yield f"{name} expected a finite number of seconds > 0 (got {value})"
            elif at_most is not None and value > at_most:
                yield f"{name} expected at most {at_most:g} seconds (got {value:g})"
            elif value < at_least:
                yield (
                    f"{name} expected at least {at_least:g} second{'s' if at_least != 1 else ''} "
                    f"(got {value:g})"
                )
            continue
        if bound == POSITIVE and not _positive_int(value):
            yield f"{name} expected > 0 (got {value})"
        elif bound == POSITIVE_OR_NULL and value is not None and not _positive_int(value):
            yield f"{name} expected > 0 or null (got {value}); null turns it off"
        elif at_most is not None and value is not None and value > at_most:
            yield f"{name} expected > 0 and <= {at_most:g} (got {value})"


def _increasing_pair(value) -> bool:
    return len(value) == 2 and all(_positive_finite(v) for v in value) and value[0] <= value[1]


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_finite(value) -> bool:
    return _finite(value) and value > 0
