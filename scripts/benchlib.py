"""What the benchmark scripts share: spawning W ranks that report through a queue, and the header
(machine, date, versions) every results file starts with."""

from __future__ import annotations

import os
import platform
import tempfile
from datetime import date

import torch
import torch.multiprocessing as mp


def run_ranks(rank_fn, world_size: int, args):
    """Spawn ``rank_fn(rank, world_size, init_file, args, queue)`` on ``world_size`` processes
    (``file://`` rendezvous in a temporary directory); return what rank 0 put on the queue."""
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            rank_fn,
            args=(world_size, os.path.join(tmp, "rdzv"), args, queue),
            nprocs=world_size,
            start_method="spawn",
        )
    return queue.get()


def machine(device: str, world_size: int) -> dict:
    """Where and when a benchmark ran."""
    name = (
        torch.cuda.get_device_name(0)
        if device == "cuda"
        else platform.processor() or platform.machine()
    )
    return {
        "date": date.today().isoformat(),
        "device": device,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
        "torch": torch.__version__,
    }
