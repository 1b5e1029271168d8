"""End-to-end cost of SyncBN in training: throughput, communication per step, peak memory.

Runs W ranks of DDP training of the default model (``conf/model/resnet_small.yaml`` on
digits-shaped 1x8x8 inputs, 10 classes, SGD) with ``norm=none``, ``bn`` and ``syncbn`` side by
side in one run (gloo on CPU; NCCL with ``--device cuda``), eager and, with ``--compile``,
``torch.compile``-d. Variants take turns in rounds so that machine drift hits all alike; a step
time is the median over rounds of the slowest rank's mean step. Inputs are fixed random tensors,
so data loading is not measured (it is the same for every norm).

Also reported:

- collectives and bytes per training step of this package's SyncBN, *counted* during a real step,
  and of ``torch.nn.SyncBatchNorm``, *computed* from its algorithm (it refuses CPU tensors): an
  ``all_gather`` of :math:`W(2C+1)` float32 per layer forward, an ``all_reduce`` of :math:`2C`
  backward. Bytes sent per rank use the ring algorithms' costs, :math:`2\\frac{W-1}{W}S` for an
  all-reduce of :math:`S` bytes and :math:`(W-1)s` for an all-gather of :math:`s` bytes per rank,
  for :math:`W = 2 \\ldots 1024`, plotted against :math:`W`;
- ``bn+collectives``: local BN issuing blocking all-reduces of SyncBN's sizes where SyncBN must
  (after each BN forward, and in its backward): the communication floor *in situ*;
- ``syncbn+telemetry/N``: SyncBN with :class:`syncbn.BNTelemetry` armed and collected every N
  steps (the cost of leaving it on);
- peak memory of a training step for each norm: resident set size on CPU (``VmHWM``, reset before
  each variant through ``/proc/self/clear_refs``), ``torch.cuda.max_memory_allocated`` on GPU.

::

    python scripts/bench/bench_train.py                    # 2 ranks, CPU, eager
    python scripts/bench/bench_train.py --compile      # adds compiled variants (slow to compile)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

import syncbn.distributed as sbdistributed
from syncbn.telemetry import BNTelemetry
from syncbn.testing.bench import init_group, machine, run_ranks
from syncbn.training.models import build_model

ROOT = Path(__file__).resolve().parents[2]
NORMS = ("none", "bn", "bn+collectives", "syncbn")
TELEMETRY = {"syncbn+telemetry/1": 1, "syncbn+telemetry/10": 10}  # BNTelemetry every N steps
WORLD_SIZES = [2**k for k in range(1, 11)]  # 2 ... 1024


def _read_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = _read_status_kib("VmHWM")
    return None if kib is None else kib / 1024


def _issue_collectives_where_syncbn_does(model: torch.nn.Module) -> None:
    """Local BN that also all-reduces 2C+2 float64 after each BN forward and 2C float32 in its
    backward, blocking, where SyncBN must: the communication floor of SyncBN *in situ*."""

    def after_forward(module, inputs, output):
        c = module.num_features
        dist.all_reduce(torch.zeros(2 * c + 2, dtype=torch.float64, device=output.device))
        if output.requires_grad:
            output.register_hook(
                lambda grad: dist.all_reduce(torch.zeros(2 * c, device=grad.device))
            )

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(after_forward)


def _variant(norm: str, compiled: bool, device, world_size: int):
    torch.manual_seed(0)
    model_cfg = OmegaConf.load(ROOT / "conf/model/resnet_small.yaml")
    base_norm = "bn" if norm == "bn+collectives" else norm
    model = build_model(model_cfg, base_norm, in_channels=1, num_classes=10).to(device)
    if norm == "bn+collectives":
        _issue_collectives_where_syncbn_does(model)
    device_ids = [device.index] if device.type == "cuda" else None
    net = DistributedDataParallel(model, device_ids=device_ids) if world_size > 1 else model
    if compiled:
        net = torch.compile(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, net, optimizer


def _step(net, optimizer, x, y) -> None:
    loss = F.cross_entropy(net(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _observed_step(telemetry: BNTelemetry, every: int):
    """A training step that arms BN telemetry and collects it (as train.py does) every N."""
    count = 0

    def step(net, optimizer, x, y) -> None:
        nonlocal count
        count += 1
        observe = count % every == 0
        if observe:
            telemetry.arm()
        _step(net, optimizer, x, y)
        if observe:
            telemetry.collect()

    return step


def _time_steps(net, optimizer, x, y, steps: int, device, step=_step) -> float:
    """Mean seconds per step of the slowest rank."""
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step(net, optimizer, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([(time.perf_counter() - started) / steps], device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _count_syncbn_collectives(net, optimizer, x, y) -> dict:
    """Collectives our SyncBN issues in one real training step: count, elements, bytes."""
    calls = []
    real = sbdistributed.all_reduce_sum

    def spy(tensor, group):
        calls.append((tensor.numel(), tensor.element_size()))
        return real(tensor, group)

    sbdistributed.all_reduce_sum = spy
    try:
        _step(net, optimizer, x, y)
    finally:
        sbdistributed.all_reduce_sum = real
    return {
        "collectives": len(calls),
        "elements": sum(n for n, _ in calls),
        "payload_bytes": sum(n * size for n, size in calls),
    }


def _bench_rank(rank: int, world_size: int, init_file: str, args, queue) -> None:
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if args.device == "cuda" else "gloo"
    init_group(rank, world_size, init_file, threads=args.threads, backend=backend, timeout_s=None)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, 1, 8, 8, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)

    variants = {}
    for compiled in [False, True] if args.compile else [False]:
        for norm in NORMS:
            if compiled and norm == "bn+collectives":
                continue  # hooks with collectives are graph breaks; the eager floor suffices
            name = norm + (" compiled" if compiled else "")
            model, net, optimizer = _variant(norm, compiled, device, world_size)
            started = time.perf_counter()
            for _ in range(args.warmup):
                _step(net, optimizer, x, y)
            warmup_s = time.perf_counter() - started
            _reset_peak_memory(device)
            _step(net, optimizer, x, y)
            variants[name] = {
                "model": model,
                "net": net,
                "optimizer": optimizer,
                "times": [],
                "peak_memory_mib": _peak_memory_mib(device),
                "warmup_s": warmup_s,
            }

    for name, every in TELEMETRY.items():
        model, net, optimizer = _variant("syncbn", False, device, world_size)
        step = _observed_step(BNTelemetry(model), every)
        for _ in range(args.warmup):
            step(net, optimizer, x, y)
        _reset_peak_memory(device)
        step(net, optimizer, x, y)
        variants[name] = {"model": model, "net": net, "optimizer": optimizer, "step": step,
                          "times": [], "peak_memory_mib": _peak_memory_mib(device),
                          "warmup_s": 0.0}  # fmt: skip

    for _ in range(args.rounds):
        for v in variants.values():
            v["times"].append(
                _time_steps(
                    v["net"], v["optimizer"], x, y, args.steps, device, v.get("step", _step)
                )  # fmt: skip
            )

    syncbn_eager = variants["syncbn"]
    counted = _count_syncbn_collectives(syncbn_eager["net"], syncbn_eager["optimizer"], x, y)
    channels = [
        m.num_features
        for m in syncbn_eager["model"].modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    params = sum(p.numel() for p in syncbn_eager["model"].parameters())
    if rank == 0:
        queue.put(
            {
                "variants": {
                    name: {
                        "step_s": statistics.median(v["times"]),
                        "samples_per_s": args.batch_size
                        * world_size
                        / statistics.median(v["times"]),
                        "peak_memory_mib": v["peak_memory_mib"],
                        "first_steps_s": v["warmup_s"],
                    }
                    for name, v in variants.items()
                },
                "syncbn_counted": counted,
                "bn_channels": channels,
                "parameters": params,
            }
        )
    dist.barrier()
    dist.destroy_process_group()


def communication_table(channels: list[int], parameters: int) -> list[dict]:
    """Per training step and rank, for each world size: collectives and bytes sent (ring costs).

    Ours: forward all_reduce of 2C+2 float64, backward all_reduce of 2C float32, per layer.
    torch.nn.SyncBatchNorm: forward all_gather of (2C+1) float32 from each of W ranks (it
    gathers mean, invstd and count), backward all_reduce of 2C float32, per layer.
    DDP's gradient all_reduce (float32, every parameter) is listed for scale; it is the same for
    every norm.
    """
    rows = []
    for w in WORLD_SIZES:
        ring_reduce = 2 * (w - 1) / w
        ours = sum(ring_reduce * ((2 * c + 2) * 8 + 2 * c * 4) for c in channels)
        torch_fwd = sum((w - 1) * (2 * c + 1) * 4 for c in channels)
        torch_bwd = sum(ring_reduce * 2 * c * 4 for c in channels)
        rows.append(
            {
                "world_size": w,
                "syncbn_collectives": 2 * len(channels),
                "syncbn_bytes_sent": ours,
                "torch_syncbn_collectives": 2 * len(channels),
                "torch_syncbn_bytes_sent": torch_fwd + torch_bwd,
                "torch_syncbn_gathered_elements": sum(w * (2 * c + 1) for c in channels),
                "ddp_gradient_bytes_sent": ring_reduce * parameters * 4,
            }
        )
    return rows


def plot_communication(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [r["world_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.loglog(w, [r["syncbn_bytes_sent"] for r in rows], "o-", label="syncbn (all_reduce)")
    ax.loglog(
        w,
        [r["torch_syncbn_bytes_sent"] for r in rows],
        "s-",
        label="torch.nn.SyncBatchNorm (all_gather)",
    )
    ax.loglog(
        w,
        [r["ddp_gradient_bytes_sent"] for r in rows],
        ":",
        color="gray",
        label="DDP gradients (for scale)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("world size (ranks)")
    ax.set_ylabel("bytes sent per rank per training step")
    ax.set_title("BN communication per step, default model (ring algorithms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_report(report: dict) -> str:
    lines = [
        f"{report['world_size']} ranks, {report['device']} ({report['device_name']}), "
        f"per-rank batch {report['batch_size']}, torch {report['torch']}, {report['date']}",
        "| variant | step (ms) | samples/s | vs bn | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    variants = report["variants"]
    for name, v in variants.items():
        base = variants["bn compiled" if name.endswith("compiled") else "bn"]["step_s"]
        memory = "n/a" if v["peak_memory_mib"] is None else f"{v['peak_memory_mib']:.0f}"
        lines.append(
            f"| {name} | {v['step_s'] * 1e3:.2f} | {v['samples_per_s']:.0f} | "
            f"{v['step_s'] / base:.3f}x | {memory} |"
        )
    if "syncbn compiled" in variants:
        lines.append(
            f"compiled / eager step time: syncbn "
            f"{variants['syncbn compiled']['step_s'] / variants['syncbn']['step_s']:.2f}, bn "
            f"{variants['bn compiled']['step_s'] / variants['bn']['step_s']:.2f}"
        )
    counted = report["syncbn_counted"]
    lines += [
        f"syncbn, counted in one step: {counted['collectives']} collectives, "
        f"{counted['elements']} elements, {counted['payload_bytes']} payload bytes "
        f"({len(report['bn_channels'])} BN layers, channels {report['bn_channels']})",
        "| W | syncbn bytes sent | torch SyncBN bytes sent | torch/syncbn | DDP grads |",
        "|---|---|---|---|---|",
    ]
    for r in report["communication"]:
        if r["world_size"] in (2, 8, 64, 512, 1024):
            lines.append(
                f"| {r['world_size']} | {r['syncbn_bytes_sent']:.0f} | "
                f"{r['torch_syncbn_bytes_sent']:.0f} | "
                f"{r['torch_syncbn_bytes_sent'] / r['syncbn_bytes_sent']:.1f} | "
                f"{r['ddp_gradient_bytes_sent']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank (train.py default)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--out", default="results/bench_train.json")
    args = parser.parse_args()

    measured = run_ranks(_bench_rank, args.world_size, args)
    report = {
        **machine(args.device, args.world_size),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        **measured,
        "communication": communication_table(measured["bn_channels"], measured["parameters"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot_communication(report["communication"], out.with_name("comm_bytes_per_step.png"))
    print(format_report(report))


if __name__ == "__main__":
    main()
