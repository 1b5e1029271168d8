"""Per-layer forward+backward time of SyncBatchNorm against its floor and a naive SyncBN.

Runs W ranks (gloo on CPU; NCCL when --device cuda and W GPUs exist) and times, side by side in one
run, for each shape:

- ``syncbn``: this package's SyncBatchNorm;
- ``local_bn``: ``nn.BatchNorm2d`` with no communication;
- ``all_reduce``: SyncBN's two all_reduces (2C+2 float64, 2C float32), alone, back to back; the
  floor is ``local_bn + all_reduce`` (SyncBN can do no better than local BN plus its collectives);
- ``local_bn_2ar``: local BN that also issues SyncBN's two all_reduces where any SyncBN must (one
  after the forward statistics, one in backward): the floor *in situ*. On gloo an all_reduce that
  follows computation costs more than one right after a barrier (its threads must wake), so this
  is the floor a real layer can reach;
- ``naive``: SyncBN written the obvious way, autograd through a differentiable all_reduce of
  ``[sum, sum of squares, count]``;
- ``torch_syncbn``: ``torch.nn.SyncBatchNorm`` (CUDA only: it refuses CPU tensors).

Each timing is the median over iterations of the slowest rank's time. Writes JSON and prints a
table::

    python scripts/bench/bench_layer.py --out results/bench_layer.json

``--count-ops`` counts instead the operations one training forward+backward of a layer issues
(top-level ATen ops, views and collectives not counted, with ``torch.profiler``) on 2 gloo ranks:
this package's CPU path, its CUDA branch (run on CPU through ``syncbn/testing/cuda_standin.py``, one
op per CUDA kernel), with its per-channel steps op by op (the default) and compiled (each compiled
step counted as one op: on CUDA it is one generated kernel, ``scripts/bench/bench_gpu.py`` counts
them),
``torch.nn.SyncBatchNorm``'s autograd function through the same stand-in kernels, and local
``nn.BatchNorm2d``::

    python scripts/bench/bench_layer.py --count-ops --out results/op_counts.json

``--phases`` splits one forward+backward of ``syncbn`` and of the in-situ floor into the
compute before each all_reduce, the all_reduce itself and the compute after the last (medians
over iterations, rank 0): where the time of a layer goes on this machine::

    python scripts/bench/bench_layer.py --phases --out results/bench_layer_phases.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn  # differentiable all_reduce (naive SyncBN)
from torch import nn

from syncbn import SyncBatchNorm
from syncbn.testing.bench import (
    init_group,
    machine,
    run_ranks,
    top_level_ops,
    torch_syncbn_class,
    use_standin_kernels,
)

SHAPES = [(16, 64, 32, 32), (8, 32, 8, 8)]


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """The textbook SyncBN: raw moments, a differentiable all_reduce, autograd for the rest."""

    def forward(self, x):
        dims = [0, 2, 3]
        n = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        packed = torch.cat([x.sum(dims), (x * x).sum(dims), n])
        packed = dist_fn.all_reduce(packed)
        c = x.shape[1]
        mean = packed[:c] / packed[-1]
        var = packed[c : 2 * c] / packed[-1] - mean * mean
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (x - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


class LocalBatchNormWithCollectives(nn.BatchNorm2d):
    """Local BN plus the two collectives of our SyncBN, of their sizes and dtypes, issued where
    SyncBN issues them: 2C+2 float64 after the forward statistics, 2C float32 in backward."""

    def forward(self, x):
        y = super().forward(x)
        forward = torch.zeros(2 * self.num_features + 2, dtype=torch.float64, device=x.device)
        dist.all_reduce(forward)
        if y.requires_grad:
            backward = torch.zeros(2 * self.num_features, device=x.device)
            y.register_hook(lambda grad: (dist.all_reduce(backward), grad)[1])
        return y


def _time(step, iters: int, warmup: int, device: torch.device) -> float:
    """Median over iterations of the slowest rank's seconds for ``step()``."""
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(elapsed.item())
    return statistics.median(times)


def _layer_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step():
        x.grad = None
        layer(x).backward(dy)

    return step


def _bench_rank(rank: int, world_size: int, init_file: str, args, queue) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_group(rank, world_size, init_file, threads=args.threads, backend=backend)
    torch.manual_seed(rank)
    rows = []
    for shape in SHAPES:
        channels = shape[1]
        x = torch.randn(shape, device=device, requires_grad=True)
        dy = torch.randn(shape, device=device)
        layers = {
            "syncbn": SyncBatchNorm(channels, device=device),
            "local_bn": nn.BatchNorm2d(channels, device=device),
            "local_bn_2ar": LocalBatchNormWithCollectives(channels, device=device),
            "naive": NaiveSyncBatchNorm(channels, device=device),
        }
        if device.type == "cuda":
            layers["torch_syncbn"] = nn.SyncBatchNorm(channels, device=device)
        row = {"shape": list(shape)}
        for name, layer in layers.items():
            row[name] = _time(_layer_step(layer, x, dy), args.iters, args.warmup, device)
        forward = torch.randn(2 * channels + 2, dtype=torch.float64, device=device)
        backward = torch.randn(2 * channels, device=device)
        row["all_reduce"] = _time(
            lambda f=forward, b=backward: (dist.all_reduce(f), dist.all_reduce(b)),
            args.iters,
            args.warmup,
            device,
        )
        row["floor"] = row["local_bn"] + row["all_reduce"]
        row["syncbn_over_floor"] = row["syncbn"] / row["floor"]
        row["syncbn_over_naive"] = row["syncbn"] / row["naive"]
        row["syncbn_over_floor_in_situ"] = row["syncbn"] / row["local_bn_2ar"]
        if "torch_syncbn" in row:
            row["syncbn_over_torch_syncbn"] = row["syncbn"] / row["torch_syncbn"]
        rows.append(row)
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


COUNT_SHAPE = (8, 32, 8, 8)


def _count_rank(rank: int, world_size: int, init_file: str, args, queue) -> None:
    init_group(rank, world_size, init_file)
    channels = COUNT_SHAPE[1]
    torch_syncbn = torch_syncbn_class()
    variants = {
        "syncbn (CPU path)": lambda: SyncBatchNorm(channels),
        "syncbn (CUDA branch, stand-in kernels)": lambda: SyncBatchNorm(channels),
        "syncbn (CUDA branch, stand-in kernels, SYNCBN_FUSE_STEPS=1)": lambda: SyncBatchNorm(
            channels
        ),
        "torch.nn.SyncBatchNorm function (stand-in kernels)": lambda: torch_syncbn(channels),
        "nn.BatchNorm2d (local)": lambda: nn.BatchNorm2d(channels),
        "naive SyncBN (autograd)": lambda: NaiveSyncBatchNorm(channels),
    }
    rows = []
    rows.append(_count_triton(channels))
    for name, build in variants.items():
        if "stand-in" in name:  # ours: its per-channel steps op by op (default) or compiled
            use_standin_kernels(compile_steps="SYNCBN_FUSE_STEPS=1" in name)
        layer = build()
        x = torch.randn(COUNT_SHAPE, requires_grad=True)
        dy = torch.randn(COUNT_SHAPE)

        def step(layer=layer, x=x, dy=dy):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)

        for _ in range(3):  # warm caches (constants, ones) as a training loop would
            step()
        ops = top_level_ops(step)
        rows.append({"variant": name, "ops": len(ops), "by_op": dict(Counter(ops).most_common())})
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def _count_triton(channels: int) -> dict:
    """The Triton kernel set (interpreted on CPU): its launches, each one op, and every other
    ATen op of the step that is not an allocation, a view or the all-reduce."""
    from syncbn.testing import cuda_standin
    from syncbn.testing.launches import launches_and_ops

    with cuda_standin.path("triton"):
        layer = SyncBatchNorm(channels)
        x = torch.randn(COUNT_SHAPE, requires_grad=True)
        dy = torch.randn(COUNT_SHAPE)

        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)

        step()  # warm caches
        launches, others = launches_and_ops(step)
    # the error word's read: on CPU tensors only (on CUDA it waits for the next host sync)
    others = [op for op in others if op not in ("allreduce_", "_local_scalar_dense")]
    ops = [f"triton::{name}" for name in launches] + [f"aten::{op}" for op in others]
    return {
        "variant": "syncbn (Triton kernels, interpreted)",
        "ops": len(ops),
        "by_op": dict(Counter(ops).most_common()),
    }


def count_ops(args) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels on CPU tensors
    rows = run_ranks(_count_rank, args.world_size, args)
    report = {
        **machine("cpu", args.world_size),
        "shape": list(COUNT_SHAPE),
        "what": "top-level ATen ops of one training forward+backward, views and collectives "
        "excluded; standin:: = one CUDA kernel call; the Triton row: its kernel launches plus "
        "any other op that is not an allocation, a view or the all-reduce",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"ops per layer forward+backward, {COUNT_SHAPE}, {args.world_size} gloo ranks")
    print("| variant | ops | by op |\n|---|---|---|")
    for row in rows:
        detail = ", ".join(f"{k.split('::')[1]} {v}" for k, v in row["by_op"].items())
        print(f"| {row['variant']} | {row['ops']} | {detail} |")


class _PhaseTimer:
    """Wraps ``dist.all_reduce`` to record, per call in a step, the compute since the previous
    mark and the all_reduce's own duration."""

    def __init__(self):
        self.real = dist.all_reduce
        self.times: dict[str, list[float]] = {}
        self.mark, self.index = 0.0, 0

    def start(self) -> None:
        self.mark, self.index = time.perf_counter(), 0

    def _add(self, key: str, value: float) -> None:
        self.times.setdefault(key, []).append(value)

    def all_reduce(self, tensor, *args, **kwargs):
        started = time.perf_counter()
        self._add(f"compute before all_reduce {self.index}", started - self.mark)
        result = self.real(tensor, *args, **kwargs)
        self.mark = time.perf_counter()
        self._add(f"all_reduce {self.index}", self.mark - started)
        self.index += 1
        return result

    def stop(self, started: float) -> None:
        now = time.perf_counter()
        self._add("compute after the last all_reduce", now - self.mark)
        self._add("forward+backward", now - started)

    def medians(self, skip: int) -> dict[str, float]:
        return {k: statistics.median(v[skip:]) for k, v in self.times.items()}


def _phase_rank(rank: int, world_size: int, init_file: str, args, queue) -> None:
    init_group(rank, world_size, init_file, threads=args.threads)
    report = {"layers": []}
    for shape in SHAPES:
        channels = shape[1]
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        for name, layer in (
            ("syncbn", SyncBatchNorm(channels)),
            ("local_bn_2ar", LocalBatchNormWithCollectives(channels)),
        ):
            timer = _PhaseTimer()
            dist.all_reduce = timer.all_reduce
            try:
                for _ in range(args.warmup + args.iters):
                    timer.real(torch.zeros(1))  # both ranks start together
                    x.grad = None
                    started = time.perf_counter()
                    timer.start()
                    layer(x).backward(dy)
                    timer.stop(started)
            finally:
                dist.all_reduce = timer.real
            report["layers"].append(
                {"shape": list(shape), "layer": name, **timer.medians(args.warmup)}
            )
    if rank == 0:
        queue.put(report)
    dist.destroy_process_group()


def phases(args) -> None:
    report = {**machine("cpu", args.world_size), **run_ranks(_phase_rank, args.world_size, args)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{args.world_size} gloo ranks, medians of rank 0 (ms)")
    for row in report["layers"]:
        parts = ", ".join(
            f"{k} {v * 1e3:.2f}" for k, v in row.items() if k not in ("shape", "layer")
        )
        print(f"{tuple(row['shape'])} {row['layer']}: {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--out",
        default=None,
        help="default: results/bench_layer.json, or results/op_counts.json with --count-ops",
    )
    parser.add_argument("--count-ops", action="store_true", help="count ops instead of timing")
    parser.add_argument("--phases", action="store_true", help="where a layer's time goes")
    args = parser.parse_args()
    if args.phases:
        args.out = args.out or "results/bench_layer_phases.json"
        phases(args)
        return
    if args.count_ops:
        args.out = args.out or "results/op_counts.json"
        count_ops(args)
        return
    args.out = args.out or "results/bench_layer.json"

    rows = run_ranks(_bench_rank, args.world_size, args)
    report = {
        **machine(args.device, args.world_size),
        "iters": args.iters,
        "unit": "seconds per forward+backward, median of slowest rank",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(report))


def format_table(report: dict) -> str:
    columns = ["syncbn", "local_bn", "all_reduce", "floor", "local_bn_2ar", "naive", "torch_syncbn"]
    present = [c for c in columns if c in report["rows"][0]]
    head = (
        "| shape | "
        + " | ".join(f"{c} (ms)" for c in present)
        + " | syncbn/floor | syncbn/floor in situ | syncbn/naive |"
    )
    lines = [
        f"{report['world_size']} ranks, {report['device']} ({report['device_name']}), "
        f"torch {report['torch']}, {report['date']}",
        head,
        "|" + "---|" * (len(present) + 4),
    ]
    for row in report["rows"]:
        cells = " | ".join(f"{row[c] * 1e3:.3f}" for c in present)
        lines.append(
            f"| {tuple(row['shape'])} | {cells} | {row['syncbn_over_floor']:.2f} "
            f"| {row['syncbn_over_floor_in_situ']:.2f} | {row['syncbn_over_naive']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
