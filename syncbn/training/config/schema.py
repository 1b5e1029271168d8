"""The types and choices of train.py's configuration: Hydra structured configs.

Each config group in ``conf/`` (``data``, ``norm``, ``optim``, ``trainer``, ``loader``, ``logger``,
``dist``) has a dataclass here, registered in Hydra's ConfigStore as ``<group>/schema`` (``data``:
one per dataset), and every yaml file of the group lists it first in its defaults list. ``task``
files are global packages (they also choose the task's default data and model), typed through
:class:`Config`. ``model`` has no schema: its keys are the arguments of whatever class
``model._target_`` names (``+model.ARG=value``); :mod:`syncbn.training.config.checks` and the
model itself check them. Hydra rejects ``optim.lr=abc``, ``trainer.compile=no_thanks`` or
``dist.backend=mpi`` while composing, naming the key, before train.py runs a line. Ranges
(``optim.lr > 0``, ...) are checked by :mod:`syncbn.training.config.checks`, before any work.

Each field is declared with :func:`key`: its type (the annotation), its one-line doc and, for the
keys :mod:`syncbn.training.config.checks` bounds from the schema alone, its range.
docs/training.md's key reference is generated from these and conf/'s values
(:mod:`syncbn.training.config.reference`; a test fails when it is stale). Every field is
``MISSING`` here: the yaml file must set it, so the values live in one place (a choice group such
as ``optim`` has one set of values per choice, which no single schema default could hold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

POSITIVE = "> 0"  # an int > 0
POSITIVE_OR_NULL = "> 0 or null"  # an int > 0, or null to turn the feature off
SECONDS = "seconds"  # a finite number of seconds > 0
RANGES = (POSITIVE, POSITIVE_OR_NULL, SECONDS)  # what :mod:`.checks` checks from the schema alone


def key(
    doc: str, bound: str | None = None, *, at_most: float | None = None, at_least: float = 0
) -> Any:
    """A config key: ``doc`` one line on what it does; ``bound`` one of :data:`RANGES` when
    :mod:`.checks` should enforce it from the schema alone (other bounds are checked there by
    hand, with their own message and fix), with an upper bound ``at_most`` (past it a value
    allocates or overflows rather than means anything) and, for :data:`SECONDS`, a lower bound
    ``at_least``. The value is set by the yaml file."""
    assert bound in (None, *RANGES), bound
    assert bound is not None or at_most is None, "at_most needs a bound"
    metadata = {"doc": doc, "range": bound, "at_most": at_most, "at_least": at_least}
    return field(default=MISSING, metadata=metadata)


def describe_range(metadata) -> str:
    """The range column of docs/training.md: ``> 0``, ``> 0, <= 10000``, ``[1, 604800] s``."""
    bound, at_most, at_least = (
        metadata.get("range"),
        metadata.get("at_most"),
        metadata.get("at_least"),
    )
    if bound == SECONDS:
        low = f"[{at_least:g}" if at_least else "(0"
        return f"{low}, {at_most:g}] s" if at_most is not None else f"{low}, inf) s"
    if bound and at_most is not None:
        return f"{bound.replace(' or null', '')}, <= {at_most:g}" + (
            " or null" if bound == POSITIVE_OR_NULL else ""
        )
    return bound or ""


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


class BadImages(Choice):
    error = "error"  # stop, naming the file
    skip = "skip"  # use the next image instead, with a warning naming the file (counted)


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
    name: TaskName = key("classification | segmentation (choose with task=...)")
    label_smoothing: float = key("cross-entropy label smoothing, in [0, 1)")
    ignore_index: int = key("target value no loss or metric counts (data.ignore_index must match)")


@dataclass
class DigitsConfig:
    name: DataName = key("digits | synthetic | cifar10 | imagefolder | digit_scenes")
    val_fraction: float = key("held out for validation, in (0, 1)")
    split_seed: int = key("fixes the train/validation split")
    augment_shift: int = key("max random translation in pixels (when trainer.augment)")
    augment_flip: bool = key("random horizontal flips (when trainer.augment)")


@dataclass
class SyntheticConfig(DigitsConfig):
    num_samples: int = key("images in total")
    image_size: int = key("H = W")
    channels: int = key("input channels")
    num_classes: int = key("classes")


@dataclass
class Cifar10Config:
    name: DataName = key("digits | synthetic | cifar10 | imagefolder | digit_scenes")
    root: str | None = key(
        "REQUIRED: directory holding cifar-10-batches-py/ (no download at run time)",
    )
    augment_shift: int = key("max random translation in pixels (when trainer.augment)")
    augment_flip: bool = key("random horizontal flips (when trainer.augment)")


@dataclass
class ImageFolderConfig:
    name: DataName = key("digits | synthetic | cifar10 | imagefolder | digit_scenes")
    root: str | None = key("REQUIRED: the directory holding train/ and val/")
    image_size: int = key("training crop and evaluation size, H = W (> 0)")
    augment: Augment = key("random_resized_crop | pad_crop | none (when trainer.augment)")
    scale: list[float] = key("random_resized_crop: range of the crop's area fraction")
    ratio: list[float] = key("random_resized_crop: range of the crop's aspect ratio")
    pad: int = key("pad_crop: padding in pixels before the random crop")
    flip: bool = key("random horizontal flips (when trainer.augment)")
    resize_ratio: float = key(
        "evaluation: resize the shorter side to image_size / this, center crop",
    )
    mean: list[float] = key("per-channel normalization (ImageNet's; use your data's)")
    std: list[float] = key("per-channel normalization")
    bad_images: BadImages = key(
        "a file Pillow cannot decode: error (stop, naming it) | skip (the next image instead, "
        "logged and counted)",
    )


@dataclass
class DigitScenesConfig(DigitsConfig):
    canvas: int = key("H = W of each scene")
    digits_per_image: list[int] = key("how many digits per scene (inclusive range)")
    digit_scale: list[int] = key(
        "each 8x8 digit upscaled by an integer factor in this range (16-32 px)",
    )
    rim: list[float] = key("upscaled intensity (0-16) in [rim0, rim1): ignored; >= rim1: the digit")
    ignore_index: int = key("the label of ignored pixels (task.ignore_index must match)")
    num_train: int = key("training scenes (generated once, held in memory)")
    num_val: int = key("validation scenes, from digit images the training scenes never use")


@dataclass
class NormConfig:
    name: NormName = key("syncbn | bn | none (choose with norm=...)")
    group_size: int | None = key(
        "ranks per sync group (e.g. 8 = within each node); null = all ranks",
    )
    debug: bool | None = key(
        "true: check all ranks are in the same layer before each collective (SYNCBN_DEBUG)",
    )
    check_finite: bool | None = key(
        "true: raise naming the layer on NaN/Inf batch statistics (SYNCBN_CHECK_FINITE)",
    )


@dataclass
class OptimConfig:
    name: OptimName = key("sgd | adamw (choose with optim=...)")
    lr: float = key("peak learning rate, finite and > 0")
    momentum: float = key("SGD momentum")
    nesterov: bool = key("Nesterov momentum")
    betas: list[float] = key("Adam betas")
    weight_decay: float = key("on conv/linear weights only (not norm parameters or biases)")
    schedule: Schedule = key("cosine | constant (after warmup)")
    warmup_steps: int = key("linear warmup steps (of the run's first global batch size)")
    min_lr_ratio: float = key("final lr as a fraction of lr, in [0, 1]")


@dataclass
class TrainerConfig:
    epochs: int = key("passes over the training set (ignored when max_steps is set)")
    max_steps: int | None = key(
        "stop after this many optimizer steps instead (> 0), counted in steps of the global "
        "batch the run started with (a resume on other ranks trains the same number of samples)",
    )
    batch_size: int = key("PER RANK; the global batch is batch_size x world size", POSITIVE)
    accumulate: int = key(
        "split each rank's batch into this many micro-batches (forward and backward each, one "
        "optimizer step); BN and SyncBN normalize per micro-batch",
        POSITIVE,
    )
    eval_batch_size: int = key("samples per rank per evaluation (and PreciseBN) batch", POSITIVE)
    augment: bool = key("per-sample augmentation of the training split (data.augment_* keys)")
    precision: Precision = key("fp32 | bf16 (torch.autocast with bfloat16, on CUDA and CPU)")
    channels_last: bool = key(
        "model and inputs in channels_last memory format (faster convs on GPUs)",
    )
    cudnn_benchmark: bool = key(
        "let cuDNN pick the fastest conv algorithms (CUDA; fixed input sizes)",
    )
    compile: bool = key("torch.compile the model (true | false)")
    grad_clip: float | None = key("max gradient norm (> 0), or null for no clipping")
    nonfinite: NonFinite = key(
        "on a NaN/Inf loss: stop (exit code 65) | skip (drop that update, go on)",
    )
    max_consecutive_skips: int = key(
        "with nonfinite=skip: stop anyway after this many non-finite steps in a row",
        POSITIVE,
    )
    eval_every: int = key("evaluate every N epochs (and after the last step)", POSITIVE)
    eval_every_steps: int | None = key(
        "also evaluate every N optimizer steps (learning curves), or null",
        POSITIVE_OR_NULL,
    )
    eval_train: bool = key("at the end, also evaluate on the training split (generalization gap)")
    eval_only: bool = key(
        "true: evaluate the checkpoint trainer.resume names on all ranks, write metrics.json, "
        "train nothing",
    )
    precise_bn_batches: int | None = key(
        "before each evaluation, set BN running stats to the exact statistics of this many "
        "un-augmented training batches per rank (syncbn.precise_bn); val/acc_ema then records "
        "the accuracy with the moving averages",
        POSITIVE_OR_NULL,
    )
    bn_telemetry_every: int | None = key(
        "every N steps, log each SyncBN layer's global batch and local-vs-global drift to W&B "
        "and metrics.json (syncbn.BNTelemetry); null = off",
        POSITIVE_OR_NULL,
    )
    ckpt_every: int = key("checkpoint every N epochs (and after the last step)", POSITIVE)
    ckpt_every_steps: int | None = key(
        "also checkpoint every N optimizer steps, or null",
        POSITIVE_OR_NULL,
    )
    keep_last: int = key(
        "keep the newest K step checkpoints (checkpoints/step-*.pt); last.pt and best.pt are "
        "kept apart from these",
        POSITIVE,
    )
    best_metric: BestMetric | None = key(
        "keep checkpoints/best.pt, the best by validation acc (max) | loss (min); null = no "
        "best.pt",
    )
    resume: str | None = key(
        "auto: continue from the newest checkpoint of run_dir/checkpoints that loads (last.pt, "
        "then step-*.pt); null: start fresh; or a path",
    )
    overwrite: bool = key(
        "true: a run directory whose checkpoints are not resumed (trainer.resume=null, or none "
        "loads) starts from scratch, moving them to checkpoints-replaced-<time>/; false: such a "
        "launch stops with exit 78 naming them",
    )
    sync_every: int = key(
        "every N steps the ranks all-reduce and read the last N steps' losses (no host sync in "
        "between), check them for NaN/Inf and agree on a stop request (SIGTERM/SIGUSR1 are "
        "acted on at most N steps after they arrive)",
        POSITIVE,
        at_most=10_000,  # a device buffer of 3 x N float64
    )
    log_every: int = key(
        "W&B train/loss logging interval (optimizer steps, > 0; sent at syncs)",
        POSITIVE,
    )
    progress: bool = key("tqdm bar on rank 0")


@dataclass
class LoaderConfig:
    workers: int = key(
        "worker processes decoding/augmenting per loader (0: in the main process; in-memory "
        "data needs none, image folders want several per GPU)",
    )
    pin_memory: bool | None = key(
        "page-locked batches for faster host-to-GPU copies; null: with CUDA",
    )
    persistent_workers: bool = key(
        "keep workers alive between epochs and evaluations (workers > 0)",
    )
    prefetch_factor: int = key("batches each worker loads ahead (workers > 0)", POSITIVE)


@dataclass
class LoggerConfig:
    mode: LoggerMode = key("offline | online | disabled")
    project: str = key("W&B project")
    entity: str | None = key("W&B team or user (null: your default)")
    group: str | None = key("group runs, e.g. one sweep")
    tags: list[str] = key("free-form tags")
    name: str | None = key("run name (null: W&B picks one)")
    init_timeout_s: float = key(
        "online: give up on the server after this long and log offline instead (< "
        "dist.timeout_s, which the other ranks wait meanwhile)",
        SECONDS,
        at_most=3600,
    )


@dataclass
class DistConfig:
    backend: Backend = key("auto: nccl with CUDA, gloo on CPU; or nccl | gloo")
    init_method: str | None = key(
        "null: torchrun's store or MASTER_ADDR/MASTER_PORT; or file:///shared/path (a "
        "rendezvous file on a filesystem all ranks share: no port)",
    )
    timeout_s: float = key(
        "every collective fails after this long instead of hanging", SECONDS, at_least=1,
        at_most=7 * 24 * 3600,
    )  # fmt: skip
    orphan_grace_s: float = key(
        "under torchrun, when the agent dies: seconds to checkpoint and exit before the worker "
        "exits hard",
        SECONDS,
        at_most=3600,
    )


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
