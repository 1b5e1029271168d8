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


def rank_from_env() -> int:
    """This process's rank as the launcher (torchrun, else SLURM) announces it; 0 when none."""
    return _env_int("RANK", "SLURM_PROCID", default=0)


def setup(
    backend: str = "auto", timeout_s: float = 300.0, init_method: str | None = None
) -> DistEnv:
    """Join the process group torchrun (or srun) describes, or run single-process.

    ``backend="auto"`` picks NCCL with one GPU per local rank when CUDA is present, gloo otherwise.
    The timeout bounds every collective, so a dead peer ends the run instead of hanging it.
    ``init_method`` (``dist.init_method``, e.g. ``file:///shared/rendezvous``) replaces the
    MASTER_ADDR/MASTER_PORT rendezvous: no port to agree on.
    """
    world_size = world_size_from_env()
    rank = rank_from_env()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    use_cuda = torch.cuda.is_available() and backend in ("auto", "nccl")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return DistEnv(rank, local_rank, 1, device, None)
    if world_size > 1 and "MASTER_ADDR" not in os.environ and not init_method:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR is not set; launch with torchrun "
            "(e.g. torchrun --standalone --nproc_per_node=2 train.py) or set MASTER_ADDR/PORT"
        )
    timeout = timedelta(seconds=timeout_s)
    store = None
    if init_method:
        pass  # the file (or tcp://) rendezvous of init_process_group
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store, attempt = attempt_store(rank, world_size, timeout)
        if attempt > 1:
            log.info("rank %d: attempt %d of this torchrun job (a restart)", rank, attempt)
    dist.init_process_group(
        backend,
        init_method=init_method if store is None else None,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if use_cuda else None,
    )
    log.info("rank %d/%d on %s, backend %s", rank, world_size, device, backend)
    return DistEnv(rank, local_rank, world_size, device, backend)


def attempt_store(rank: int, world_size: int, timeout: timedelta) -> tuple[dist.Store, int]:
    """The torchrun agent's store, namespaced by restart attempt, and the attempt number (1, 2...).

    torchrun (``--max-restarts``) keeps one TCPStore for the whole job and its workers bootstrap
    their process group from it under the same keys every attempt. A restarted rank can then read
    a peer's address left by the previous attempt before the peer rewrites it, connect to a dead
    port and fail ("Gloo connectFullMesh failed ... Connection refused"; NCCL's unique id has the
    same race, pytorch/pytorch#167288). We key each attempt apart.

    ``TORCHELASTIC_RESTART_COUNT`` cannot be the key: on a multi-node job only the agent whose
    worker failed counts a restart, the others restart their workers without counting. Instead
    every rank counts its own starts in the store (``store.add``); as torchrun restarts all
    workers of all nodes together, the counts agree. A store barrier then confirms that all
    ranks joined the same attempt, so a disagreement (for example after an elastic membership
    change) ends in a clear error after ``timeout`` instead of a bootstrap that never completes.
    """
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    attempt = agent.add(f"syncbn/starts/rank{rank}", 1)
    store = dist.PrefixStore(f"syncbn/attempt{attempt}", agent)
    store.set(f"joined/{rank}", "1")
    try:
        store.wait([f"joined/{r}" for r in range(world_size)], timeout)
    except (RuntimeError, dist.DistStoreError) as error:  # DistStoreError on timeout
        raise RuntimeError(
            f"rank {rank} is on attempt {attempt} of this torchrun job but not every one of the "
            f"{world_size} ranks joined that attempt within {timeout} (ranks that never started, "
            "or a changed membership of an elastic job); expected all ranks to start together "
            f"(got: {error})"
        ) from error
    return store, attempt


def teardown(env: DistEnv) -> None:
    if env.backend is not None and dist.is_initialized():
        dist.destroy_process_group()
