"""The types and choices of train.py's configuration: Hydra structured configs.

Each config group in ``conf/`` (``data``, ``norm``, ``optim``, ``trainer``, ``loader``, ``logger``,
``dist``) has a dataclass here, registered in Hydra's ConfigStore as ``<group>/schema`` (``data``:
one per dataset), and every yaml file of the group lists it first in its defaults list. ``task``
files are global packages (they also choose the task's default data and model), typed through
:class:`Config`. ``model`` has no schema: its keys are the arguments of whatever class
``model._target_`` names (``+model.ARG=value``); :mod:`syncbn.training.config.checks` and the
model itself check them. The yaml
files hold the values (and a comment on every key); these classes hold the types: Hydra rejects
``optim.lr=abc``, ``trainer.compile=no_thanks`` or ``dist.backend=mpi`` while composing, naming
the key, before train.py runs a line. Ranges (``optim.lr > 0``, ...) are checked by
:mod:`syncbn.training.config.checks`, before any work.

Every field is ``MISSING`` by default: the yaml file must set it, so the values live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """A string choice: compares, hashes and formats as its value (``NormName.bn == "bn"``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class NormName(Choice):
    syncbn = "syncbn"
    bn = "bn"
    none = "none"


class DataName(Choice):
    digits = "digits"
    synthetic = "synthetic"
    cifar10 = "cifar10"
    imagefolder = "imagefolder"
    digit_scenes = "digit_scenes"


class TaskName(Choice):
    classification = "classification"
    segmentation = "segmentation"


class Augment(Choice):
    random_resized_crop = "random_resized_crop"
    pad_crop = "pad_crop"
    none = "none"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"  # torch.autocast(dtype=torch.bfloat16): CUDA and CPU


class OptimName(Choice):
    sgd = "sgd"
    adamw = "adamw"


class Schedule(Choice):
    cosine = "cosine"
    constant = "constant"


class Backend(Choice):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class LoggerMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class NonFinite(Choice):
    stop = "stop"  # end the run (exit code 65) at the first non-finite loss
    skip = "skip"  # drop that step's update and go on (up to max_consecutive_skips in a row)


class BestMetric(Choice):
    acc = "acc"  # validation accuracy (segmentation: pixel accuracy), higher is better
    loss = "loss"  # validation loss, lower is better
    top5 = "top5"  # classification: top-5 accuracy, higher is better
    miou = "miou"  # segmentation: mean IoU, higher is better


@dataclass
class TaskConfig:
    name: TaskName = MISSING
    label_smoothing: float = MISSING
    ignore_index: int = MISSING


@dataclass
class DigitsConfig:
    name: DataName = MISSING
    val_fraction: float = MISSING
    split_seed: int = MISSING
    augment_shift: int = MISSING
    augment_flip: bool = MISSING


@dataclass
class SyntheticConfig(DigitsConfig):
    num_samples: int = MISSING
    image_size: int = MISSING
    channels: int = MISSING
    num_classes: int = MISSING


@dataclass
class Cifar10Config:
    name: DataName = MISSING
    root: str | None = MISSING
    augment_shift: int = MISSING
    augment_flip: bool = MISSING


@dataclass
class ImageFolderConfig:
    name: DataName = MISSING
    root: str | None = MISSING
    image_size: int = MISSING
    augment: Augment = MISSING
    scale: list[float] = MISSING
    ratio: list[float] = MISSING
    pad: int = MISSING
    flip: bool = MISSING
    resize_ratio: float = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING


@dataclass
class DigitScenesConfig(DigitsConfig):
    canvas: int = MISSING
    digits_per_image: list[int] = MISSING
    digit_scale: list[int] = MISSING
    rim: list[float] = MISSING
    ignore_index: int = MISSING
    num_train: int = MISSING
    num_val: int = MISSING


@dataclass
class NormConfig:
    name: NormName = MISSING
    group_size: int | None = MISSING
    debug: bool | None = MISSING
    check_finite: bool | None = MISSING


@dataclass
class OptimConfig:
    name: OptimName = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    nesterov: bool = MISSING
    betas: list[float] = MISSING
    weight_decay: float = MISSING
    schedule: Schedule = MISSING
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    max_steps: int | None = MISSING
    batch_size: int = MISSING
    accumulate: int = MISSING
    eval_batch_size: int = MISSING
    augment: bool = MISSING
    precision: Precision = MISSING
    channels_last: bool = MISSING
    cudnn_benchmark: bool = MISSING
    compile: bool = MISSING
    grad_clip: float | None = MISSING
    nonfinite: NonFinite = MISSING
    max_consecutive_skips: int = MISSING
    eval_every: int = MISSING
    eval_every_steps: int | None = MISSING
    eval_train: bool = MISSING
    eval_only: bool = MISSING
    precise_bn_batches: int | None = MISSING
    bn_telemetry_every: int | None = MISSING
    ckpt_every: int = MISSING
    ckpt_every_steps: int | None = MISSING
    keep_last: int = MISSING
    best_metric: BestMetric | None = MISSING
    resume: str | None = MISSING
    sync_every: int = MISSING
    log_every: int = MISSING
    progress: bool = MISSING


@dataclass
class LoaderConfig:
    workers: int = MISSING
    pin_memory: bool | None = MISSING
    persistent_workers: bool = MISSING
    prefetch_factor: int = MISSING


@dataclass
class LoggerConfig:
    mode: LoggerMode = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING
    name: str | None = MISSING
    init_timeout_s: float = MISSING


@dataclass
class DistConfig:
    backend: Backend = MISSING
    init_method: str | None = MISSING
    timeout_s: float = MISSING
    orphan_grace_s: float = MISSING


@dataclass
class Config:
    """The top level (``conf/config.yaml``): the groups, then ``seed`` and ``run_dir``."""

    task: TaskConfig = MISSING
    model: Any = MISSING  # the arguments of model._target_
    data: Any = MISSING  # one of the data schemas below
    norm: NormConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    loader: LoaderConfig = MISSING
    logger: LoggerConfig = MISSING
    dist: DistConfig = MISSING
    seed: int = MISSING
    run_dir: str = MISSING


GROUPS = {
    ("data", "schema_digits"): DigitsConfig,
    ("data", "schema_synthetic"): SyntheticConfig,
    ("data", "schema_cifar10"): Cifar10Config,
    ("data", "schema_imagefolder"): ImageFolderConfig,
    ("data", "schema_digit_scenes"): DigitScenesConfig,
    ("loader", "schema"): LoaderConfig,
    ("norm", "schema"): NormConfig,
    ("optim", "schema"): OptimConfig,
    ("trainer", "schema"): TrainerConfig,
    ("logger", "schema"): LoggerConfig,
    ("dist", "schema"): DistConfig,
}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent); call before composing ``conf/``."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for (group, name), node in GROUPS.items():
        store.store(group=group, name=name, node=node)
