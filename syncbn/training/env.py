"""The distributed environment of one training process: rank, device, backend, process group."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    """First of ``names`` set in the environment (torchrun's, then SLURM's), as an int."""
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def world_size_from_env() -> int:
    """The world size the launcher (torchrun, else SLURM) announces; 1 when there is none."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def setup(backend: str = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Join the process group torchrun (or srun) describes, or run single-process.

    ``backend="auto"`` picks NCCL with one GPU per local rank when CUDA is present, gloo otherwise.
    The timeout bounds every collective, so a dead peer ends the run instead of hanging it.
    """
    world_size = world_size_from_env()
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    use_cuda = torch.cuda.is_available() and backend in ("auto", "nccl")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return DistEnv(rank, local_rank, 1, device, None)
    if world_size > 1 and "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR is not set; launch with torchrun "
            "(e.g. torchrun --standalone --nproc_per_node=2 train.py) or set MASTER_ADDR/PORT"
        )
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if use_cuda else None,
    )
    log.info("rank %d/%d on %s, backend %s", rank, world_size, device, backend)
    return DistEnv(rank, local_rank, world_size, device, backend)


def teardown(env: DistEnv) -> None:
    if env.backend is not None and dist.is_initialized():
        dist.destroy_process_group()
