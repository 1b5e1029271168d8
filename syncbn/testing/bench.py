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


def init_group(
    rank: int,
    world_size: int,
    init_file: str,
    *,
    threads: int = 1,
    backend: str = "gloo",
    timeout_s: float | None = 120.0,
) -> None:
    """Join the benchmark's process group over a ``file://`` rendezvous (no port to race for),
    with ``threads`` torch threads per rank (the ranks share few cores). ``timeout_s=None``:
    torch's default timeout."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(threads)
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size, **timeout
    )


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


COMPILED_REGION = "Torch-Compiled Region"


def top_level_ops(fn) -> list[str]:
    """Run ``fn`` under the profiler; return the names of the top-level ATen operations it
    issued (an op called from inside another op is not counted; neither are views), of the
    stand-in CUDA kernels (``standin::``) and of compiled steps (``compiled::step``: a call of a
    ``torch.compile``d function, whatever runs inside it), each counted once per call.
    Collectives are left out: every variant compared runs the same ones."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    counted = []
    for event in profile.events():
        compiled = event.name.startswith(COMPILED_REGION)
        if not compiled and (
            not event.name.startswith(("aten::", "standin::")) or event.name in VIEW_OPS
        ):
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            if parent.name.startswith(("aten::", "c10d::", "standin::", COMPILED_REGION)):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            counted.append("compiled::step" if compiled else event.name)
    return counted


def torch_syncbn_class():
    """``torch.nn.SyncBatchNorm``'s synchronized path as a module, forced on any group size and
    device: its autograd function, called as the module calls it (the module itself skips it at
    world size 1 and refuses CPU tensors)."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.modules._functions import SyncBatchNorm as TorchFunction

    class TorchSyncBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            if not self.training:
                return super().forward(x)
            self.num_batches_tracked.add_(1)
            return TorchFunction.apply(
                x,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                self.eps,
                self.momentum,
                dist.group.WORLD,
                dist.get_world_size(),
            )

    return TorchSyncBatchNorm


def use_standin_kernels(compile_steps: bool = False) -> None:
    """Route both CUDA branches to the CPU model of the CUDA kernels (:mod:`.cuda_standin`):
    ours through the kernel override (its per-channel steps compiled as on CUDA with
    ``compile_steps``), torch's through ``torch.batch_norm_*``."""
    from syncbn import kernels
    from syncbn.testing import cuda_standin

    kernels.override.kernels = kernels.FusedKernels(cuda_standin, compile_steps=compile_steps)
    for name in (
        "batch_norm_stats",
        "batch_norm_gather_stats_with_counts",
        "batch_norm_elemt",
        "batch_norm_backward_reduce",
        "batch_norm_backward_elemt",
    ):
        setattr(torch, name, getattr(cuda_standin, name))
