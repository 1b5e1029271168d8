"""Train a small ResNet with synchronized batch norm under DDP. Configured by Hydra (conf/).

Single process::

    python train.py

DDP on one machine (gloo on CPU, NCCL with one GPU per rank)::

    torchrun --standalone --nproc_per_node=2 train.py norm=syncbn trainer.batch_size=8

Several machines (run on each node, same --rdzv-id)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=HOST:29500 --rdzv-id=JOB train.py hydra.run.dir=runs/JOB
"""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from syncbn.training import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@record  # a failing rank's traceback goes to torchrun's error file and its failure summary
def main(cfg: DictConfig) -> float:
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # only rank 0 talks
    return run(cfg)["val_acc"]  # returned for Hydra sweepers


if __name__ == "__main__":
    main()
