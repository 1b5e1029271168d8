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
        context = mp.start_processes(
            rank_fn,
            args=(world_size, os.path.join(tmp, "rdzv"), args, queue),
            nprocs=world_size,
            start_method="spawn",
            join=False,
        )
        # Read while the ranks run: a result larger than the pipe's buffer (~64 KB) would
        # otherwise block rank 0's put() while we wait for rank 0 to exit. join() raises when a
        # rank fails, so a crash is reported instead of waited on.
        while queue.empty():
            if context.join(timeout=0.2):
                break
        result = queue.get() if not queue.empty() else None
        while not context.join():
            pass
    return result


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


# Ops that only make views or read metadata: no kernel, no copy. Not counted.
VIEW_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "view alias as_strided detach expand narrow permute reshape _reshape_alias select slice "
        "split split_with_sizes squeeze t transpose unbind unsqueeze lift_fresh resolve_conj "
        "resolve_neg"
    ).split()
)


def top_level_ops(fn) -> list[str]:
    """Run ``fn`` under the profiler; return the names of the top-level ATen operations it
    issued (an op called from inside another op is not counted; neither are views) and of the
    stand-in CUDA kernels (``standin::``), each counted once per call. Collectives are left out:
    every variant compared runs the same ones."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    counted = []
    for event in profile.events():
        if not event.name.startswith(("aten::", "standin::")) or event.name in VIEW_OPS:
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            if parent.name.startswith(("aten::", "c10d::", "standin::")):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            counted.append(event.name)
    return counted
