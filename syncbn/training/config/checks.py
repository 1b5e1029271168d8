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
from .schema import POSITIVE, POSITIVE_OR_NULL, LoaderConfig, TrainerConfig


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


def _trainer(t) -> Iterator[str]:
    if t.max_steps is None:
        if not _positive_int(t.epochs):
            yield f"trainer.epochs expected > 0 (got {t.epochs}); or set trainer.max_steps"
    elif not _positive_int(t.max_steps):
        yield (
            f"trainer.max_steps expected > 0 or null (got {t.max_steps}); null trains "
            f"trainer.epochs={t.epochs} epochs"
        )
    yield from _ranged("trainer", TrainerConfig, t)
    if _positive_int(t.batch_size) and _positive_int(t.accumulate) and t.batch_size % t.accumulate:
        yield (
            f"trainer.accumulate expected a divisor of trainer.batch_size={t.batch_size} (got "
            f"{t.accumulate}): each rank's batch is split into that many equal micro-batches"
        )
    if t.grad_clip is not None and not _positive_finite(t.grad_clip):
        yield (
            f"trainer.grad_clip expected a finite max norm > 0 or null (got {t.grad_clip}); "
            f"null turns clipping off"
        )
    resume = t.resume
    if resume not in (None, "", "auto") and not Path(resume).is_file():
        yield f"trainer.resume expected a checkpoint file, 'auto' or null (got {resume!r}: missing)"
    if t.eval_only and not resume:
        yield (
            "trainer.eval_only=true expected a checkpoint to evaluate (got trainer.resume=null); "
            "pass trainer.resume=PATH/TO/checkpoint.pt"
        )


def _optim(o) -> Iterator[str]:
    if not _positive_finite(o.lr):
        yield f"optim.lr expected a finite number > 0 (got {o.lr})"
    if not (_finite(o.weight_decay) and o.weight_decay >= 0):
        yield f"optim.weight_decay expected a finite number >= 0 (got {o.weight_decay})"
    if not (_finite(o.momentum) and 0 <= o.momentum < 1):
        yield f"optim.momentum expected a number in [0, 1) (got {o.momentum})"
    if len(o.betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in o.betas):
        yield f"optim.betas expected two numbers in [0, 1) (got {list(o.betas)})"
    if not (isinstance(o.warmup_steps, int) and o.warmup_steps >= 0):
        yield f"optim.warmup_steps expected >= 0 (got {o.warmup_steps})"
    if not (_finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1):
        yield f"optim.min_lr_ratio expected a number in [0, 1] (got {o.min_lr_ratio})"


def _data(d) -> Iterator[str]:
    if "val_fraction" in d and not (_finite(d.val_fraction) and 0 < d.val_fraction < 1):
        yield (
            f"data.val_fraction expected a fraction in (0, 1) (got {d.val_fraction}): the "
            f"validation split must hold samples and so must the training split"
        )
    if "augment_shift" in d and d.augment_shift < 0:
        yield f"data.augment_shift expected >= 0 pixels (got {d.augment_shift})"
    for key in ("num_samples", "image_size", "channels", "canvas", "num_train", "num_val"):
        if key in d and not _positive_int(d[key]):
            yield f"data.{key} expected > 0 (got {d[key]})"
    if "num_classes" in d and not (isinstance(d.num_classes, int) and d.num_classes >= 2):
        yield f"data.num_classes expected >= 2 (got {d.num_classes})"
    if "pad" in d and d.pad < 0:
        yield f"data.pad expected >= 0 pixels (got {d.pad})"
    for key in ("scale", "ratio", "digits_per_image", "digit_scale", "rim"):
        if key in d and not _increasing_pair(d[key]):
            yield f"data.{key} expected [low, high] with 0 < low <= high (got {list(d[key])})"
    if "scale" in d and _increasing_pair(d.scale) and d.scale[1] > 1:
        yield f"data.scale expected area fractions in (0, 1] (got {list(d.scale)})"
    if "canvas" in d and "digit_scale" in d and _increasing_pair(d.digit_scale):
        if _positive_int(d.canvas) and 8 * d.digit_scale[1] > d.canvas:
            yield (
                f"data.digit_scale expected digits (8 x scale pixels) that fit the "
                f"{d.canvas}-pixel canvas (got {list(d.digit_scale)})"
            )
    if "resize_ratio" in d and not (_finite(d.resize_ratio) and 0 < d.resize_ratio <= 1):
        yield f"data.resize_ratio expected a number in (0, 1] (got {d.resize_ratio})"
    for key in ("mean", "std"):
        if key in d and (len(d[key]) != 3 or not all(_finite(v) for v in d[key])):
            yield f"data.{key} expected 3 numbers, one per RGB channel (got {list(d[key])})"
    if "std" in d and not all(_positive_finite(v) for v in d.std):
        yield f"data.std expected numbers > 0 (got {list(d.std)})"


def _model(m) -> Iterator[str]:
    if "_target_" not in m or OmegaConf.is_missing(m, "_target_") or not m._target_:
        yield (
            "model._target_ expected the import path of a class or function returning an "
            "nn.Module (got none); e.g. model._target_=torchvision.models.resnet50"
        )
    if "widths" in m and (len(m.widths) == 0 or not all(_positive_int(w) for w in m.widths)):
        yield f"model.widths expected a non-empty list of channel counts > 0 (got {list(m.widths)})"
    if "blocks_per_stage" in m and not _positive_int(m.blocks_per_stage):
        yield f"model.blocks_per_stage expected > 0 (got {m.blocks_per_stage})"
    if "init_scale" in m and not _positive_finite(m.init_scale):
        yield f"model.init_scale expected a finite number > 0 (got {m.init_scale})"


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
    for key, value in [
        ("dist.timeout_s", dist.timeout_s),
        ("dist.orphan_grace_s", dist.orphan_grace_s),
        ("logger.init_timeout_s", logger.init_timeout_s),
    ]:
        if not _positive_finite(value):
            yield f"{key} expected a finite number of seconds > 0 (got {value})"
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
        bound, value = f.metadata.get("range"), node[f.name]
        if bound == POSITIVE and not _positive_int(value):
            yield f"{group}.{f.name} expected > 0 (got {value})"
        elif bound == POSITIVE_OR_NULL and value is not None and not _positive_int(value):
            yield f"{group}.{f.name} expected > 0 or null (got {value}); null turns it off"


def _increasing_pair(value) -> bool:
    return len(value) == 2 and all(_positive_finite(v) for v in value) and value[0] <= value[1]


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_finite(value) -> bool:
    return _finite(value) and value > 0
