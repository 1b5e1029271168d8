"""Train with synchronized batch norm under DDP. Configured by Hydra (conf/).

Single process (a small ResNet on scikit-learn's digits)::

    python train.py
    python train.py task=segmentation            # DeepLab-style model on digit scenes, mIoU

Your model and images::

    torchrun --nproc_per_node=8 train.py model=custom model._target_=torchvision.models.resnet50 \
        data=imagefolder data.root=/data/imagenet loader.workers=8 trainer.precision=bf16

DDP on one machine (gloo on CPU, NCCL with one GPU per rank)::

    torchrun --standalone --nproc_per_node=2 train.py norm=syncbn trainer.batch_size=8

Several machines (run on each node, same --rdzv-id)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=HOST:29500 --rdzv-id=JOB --rdzv-conf=join_timeout=300 \
        train.py hydra.run.dir=runs/JOB

Exit codes (``syncbn/training/lifecycle/exit_codes.py``): 0 finished, 1 crashed, 65 stopped on a
non-finite loss, 73 run directory in use by another job, 75 preempted (checkpoint written:
relaunch to resume), 78 bad configuration.
"""

# ruff: noqa: E402 (the signal handlers below come before the other imports, on purpose)
from __future__ import annotations

import signal

# Catch stop signals first thing, before the imports and the start-up that take seconds to
# minutes (a signal then killed the process outright: no checkpoint, no status.json); the
# training loop acts on them (syncbn/training/lifecycle/preemption.py).
_caught: list[int] = []
for _name in ("SIGTERM", "SIGUSR1"):
    signal.signal(getattr(signal, _name), lambda signum, frame: _caught.append(signum))

import logging
import os
import sys

import hydra
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from syncbn.training import ConfigError, run
from syncbn.training.config import schema
from syncbn.training.errors import RunDirLocked
from syncbn.training.lifecycle import exit_codes, preemption

preemption.install(_caught)  # the loop's handlers from here on, with what was caught so far
schema.register()  # the types of conf/'s groups, before Hydra composes them
_started = False  # whether Hydra composed the config and called main


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@record  # a failing rank's traceback goes to torchrun's error file and its failure summary
def main(cfg: DictConfig) -> float | None:
    global _started
    _started = True
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # only rank 0 talks
    try:
        result = run(cfg)
    except ConfigError as error:  # one message per rank, no traceback
        print(f"train.py{f' (rank {rank})' if rank else ''}: {error}", file=sys.stderr)
        sys.exit(exit_codes.CONFIG)
    except RunDirLocked as error:  # another job's run directory: nothing was written
        print(f"train.py{f' (rank {rank})' if rank else ''}: {error}", file=sys.stderr)
        sys.exit(exit_codes.LOCKED)
    if result.exit_code != exit_codes.OK:
        sys.exit(result.exit_code)
    return result.objective  # the task's primary validation metric, for Hydra sweepers


if __name__ == "__main__":
    try:
        main()
    except SystemExit as exit_:
        # Hydra prints a composition error (a wrong type or choice, an unknown key) naming the
        # key and exits 1 before main runs: that is a configuration error too.
        if exit_.code == 1 and not _started:
            sys.exit(exit_codes.CONFIG)
        raise
