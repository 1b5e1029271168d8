"""Does BN improve gradient flow? Per-layer gradient norms of a deep plain network, on 2 ranks.

A plain fully-connected network with no residual connections, ``--depth`` linear layers of
``--width`` units (default 16 x 64, so the 15 hidden layers after the first are all 64 x 64, and
the first is 64 x 64 too, on digits' 64 pixels), sigmoid activations, PyTorch's default
initialization, trained with SGD on scikit-learn's digits with data parallelism on 2 gloo ranks
(DDP), for each of

- ``none``: no normalization;
- ``bn``: ``nn.BatchNorm1d`` after every hidden linear layer, statistics of each rank's own batch;
- ``syncbn``: the same network through :func:`syncbn.convert_sync_batchnorm` (global batch);

and ``--seeds`` seeds (the same initial weights and batches for every norm of a seed). Recorded:
:math:`\\lVert \\nabla W_l \\rVert_F` and :math:`\\lVert W_l \\rVert_F` of every linear layer's
weight (after DDP's gradient averaging, so the gradient of the global batch) every
``--log-every`` steps, the first-to-last ratio
:math:`\\lVert \\nabla W_1 \\rVert / \\lVert \\nabla W_{L-1} \\rVert` (first linear layer over
the last *hidden* one, both 64 x 64, so the ratio measures depth alone and not shape), the global
training loss, and test accuracy every ``--eval-every`` steps. Writes
``<out>/results.json`` and ``<out>/gradient_flow.png``::

    python scripts/experiments/gradient_flow.py          # 3 seeds x 3 norms, about 2 minutes here
    python scripts/experiments/gradient_flow.py --quick          # smoke test: 1 seed, 20 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mlplib import (
    ACTIVATIONS,
    NORMS,
    finish_group,
    geo_mean,
    global_batches,
    init_group,
    linear_layers,
    load_digits,
    mean_min_max,
    mlp,
    rank_slice,
    rounded,
    spawn,
    write_json,
)
from torch.nn.parallel import DistributedDataParallel

from syncbn.testing.bench import machine

COLORS = {"none": "tab:gray", "bn": "tab:orange", "syncbn": "tab:blue"}


def train_one(norm: str, seed: int, args, data, rank: int, world_size: int) -> dict:
    """Train one (norm, seed) configuration on every rank; return its record (rank 0's view:
    gradients and loss are global, test accuracy uses rank 0's running statistics)."""
    torch.manual_seed(seed)
    widths = [64] + [args.width] * (args.depth - 1) + [10]
    model = mlp(widths, norm, args.activation, init_gain=args.init_gain)
    net = DistributedDataParallel(model, forward_sync_buffers=False)  # buffers are per rank
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    linears = linear_layers(model)
    first, last_hidden = linears[0], linears[-2]
    record = {"norm": norm, "seed": seed, "log_steps": [], "grad_norms": [], "weight_norms": []}
    record |= {"ratio": [], "loss": [], "eval_steps": [], "test_acc": []}
    started = time.perf_counter()
    batches = global_batches(len(data.x_train), args.batch_size * world_size, args.steps, seed)
    for step, indices in enumerate(batches):
        local = rank_slice(indices, rank, world_size)
        loss = F.cross_entropy(net(data.x_train[local]), data.y_train[local])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step % args.log_every == 0 or step == args.steps - 1:
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            grads = [layer.weight.grad.norm().item() for layer in linears]
            record["log_steps"].append(step)
            record["grad_norms"].append(rounded(grads))
            record["weight_norms"].append(
                rounded([layer.weight.norm().item() for layer in linears])
            )
            ratio = first.weight.grad.norm().item() / last_hidden.weight.grad.norm().item()
            record["ratio"].append(rounded(ratio))
            record["loss"].append(rounded(global_loss.item() / world_size))
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step == 0 or step == args.steps - 1:
            record["eval_steps"].append(step + 1)  # accuracy after step + 1 updates
            record["test_acc"].append(rounded(_accuracy(model, data)))
    record["train_s"] = round(time.perf_counter() - started, 2)
    return record


@torch.no_grad()
def _accuracy(model, data) -> float:
    model.eval()
    acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    model.train()
    return acc


def _rank(rank: int, world_size: int, init_file: str, args) -> list[dict]:
    init_group(rank, world_size, init_file)
    data = load_digits()
    records = []
    for seed in range(args.seeds):
        for norm in args.norms:
            records.append(train_one(norm, seed, args, data, rank, world_size))
            if rank == 0:
                r = records[-1]
                print(f"seed {seed} {norm:>6}: {r['train_s']:.1f} s, test acc "
                      f"{r['test_acc'][-1]:.3f}", flush=True)  # fmt: skip
    finish_group()
    return records


def summarize(records: list[dict], snapshots: list[int]) -> dict:
    """Per norm: per-layer gradient norms at the snapshot steps and the ratio over steps, as
    geometric means over seeds (they span orders of magnitude), and final test accuracy."""
    summary = {}
    for norm in dict.fromkeys(r["norm"] for r in records):
        rs = [r for r in records if r["norm"] == norm]
        steps = rs[0]["log_steps"]
        layers_at = {}
        for s in snapshots:
            i = steps.index(s)
            per_seed = [r["grad_norms"][i] for r in rs]
            layers_at[str(s)] = rounded([geo_mean(list(v)) for v in zip(*per_seed, strict=True)])
        ratios = list(zip(*[r["ratio"] for r in rs], strict=True))
        summary[norm] = {
            "grad_norms_at": layers_at,
            "ratio_geo_mean": rounded([geo_mean(list(v)) for v in ratios]),
            "ratio_min": rounded([min(v) for v in ratios]),
            "ratio_max": rounded([max(v) for v in ratios]),
            "ratio_at": {
                str(s): rounded(geo_mean(list(ratios[steps.index(s)]))) for s in snapshots
            },
            "final_test_acc": mean_min_max([r["test_acc"][-1] for r in rs]),
            "final_loss": mean_min_max([r["loss"][-1] for r in rs]),
        }
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, records = report["summary"], report["runs"]
    norms = list(summary)
    steps = records[0]["log_steps"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    cmap = plt.get_cmap("viridis")
    snapshots = report["snapshots"]
    lo = min(min(v) for n in norms for v in summary[n]["grad_norms_at"].values())
    hi = max(max(v) for n in norms for v in summary[n]["grad_norms_at"].values())
    for ax in axes[0][len(norms) :]:
        ax.set_axis_off()  # fewer than 3 norms ran
    for ax, norm in zip(axes[0], norms, strict=False):
        for k, s in enumerate(snapshots):
            norms_at = summary[norm]["grad_norms_at"][str(s)]
            color = cmap(k / max(1, len(snapshots) - 1))
            ax.semilogy(range(1, len(norms_at) + 1), norms_at, "o-", ms=3, color=color,
                        label=f"step {s}")  # fmt: skip
        ax.set_ylim(lo / 3, hi * 3)
        ax.set_title(f"{norm}: per-layer gradient norm")
        ax.set_xlabel("linear layer (1 = input side)")
        ax.set_ylabel(r"$\|\nabla W_l\|_F$ (geo. mean of seeds)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)

    ax = axes[1][0]
    for norm in norms:
        s = summary[norm]
        ax.semilogy(steps, s["ratio_geo_mean"], color=COLORS[norm], label=norm)
        ax.fill_between(steps, s["ratio_min"], s["ratio_max"], color=COLORS[norm], alpha=0.2)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set_title("first / last hidden layer gradient norm")
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\|\nabla W_1\| / \|\nabla W_{L-1}\|$")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)

    for ax, key, ylabel, xkey in (
        (axes[1][1], "test_acc", "test accuracy", "eval_steps"),
        (axes[1][2], "loss", "training loss (global batch)", "log_steps"),
    ):
        for norm in norms:
            for i, r in enumerate(rr for rr in records if rr["norm"] == norm):
                ax.plot(r[xkey], r[key], color=COLORS[norm], alpha=0.8,
                        label=norm if i == 0 else None)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1][1].set_title("test accuracy (each seed)")
    axes[1][2].set_title("training loss (each seed)")
    gain = report["init_gain"]
    init = "PyTorch default" if gain is None else f"N(0, {gain:g}²/fan_in)"
    fig.suptitle(
        f"Deep plain MLP ({report['depth']} linear layers x {report['width']}, "
        f"{report['activation']}, init {init}), digits, {report['world_size']} ranks x "
        f"{report['batch_size']}, SGD lr {report['lr']} momentum {report['momentum']}, "
        f"{report['seeds']} seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=16, help="linear layers, classifier included")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="sigmoid")
    parser.add_argument("--init-gain", type=float, default=None,
                        help="weights ~ N(0, gain^2/fan_in); default: PyTorch's init")  # fmt: skip
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS))
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--snapshots", type=int, nargs="+", default=[0, 50, 200, 599],
                        help="steps whose per-layer norms are plotted")  # fmt: skip
    parser.add_argument("--out", default="results/gradient_flow")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 20 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.log_every, args.eval_every = 1, 20, 5, 10
        args.snapshots = [0, 10, 19]
    if args.depth < 3:
        parser.error(f"--depth expected at least 3 linear layers (got {args.depth})")
    bad = [s for s in args.snapshots if not 0 <= s < args.steps]
    bad += [s for s in args.snapshots if s % args.log_every and s != args.steps - 1]
    if bad:
        parser.error(
            f"--snapshots expected steps in [0, {args.steps}) that are multiples of --log-every "
            f"{args.log_every} or the last step (got {bad})"
        )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    records = spawn(_rank, args.world_size, args)
    wall_s = time.perf_counter() - started
    report = {
        **machine("cpu", args.world_size),
        "command": " ".join(
            ["python scripts/experiments/gradient_flow.py", *(argv or sys.argv[1:])]
        ),
        "wall_time_s": round(wall_s, 1),
        **{k: v for k, v in vars(args).items() if k not in ("out", "quick")},
        "ratio_definition": "||grad W_1|| / ||grad W_{L-1}|| (first linear / last hidden linear)",
        "summary": summarize(records, args.snapshots),
        "runs": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", report)
    plot(report, out / "gradient_flow.png")
    for norm, s in report["summary"].items():
        ratios = ", ".join(f"step {k}: {v:.3g}" for k, v in s["ratio_at"].items())
        acc = s["final_test_acc"]
        print(f"{norm:>7}: first/last ratio {ratios}; final test acc {acc['mean']:.3f} "
              f"[{acc['min']:.3f}, {acc['max']:.3f}]")  # fmt: skip
    print(f"wall time {wall_s:.1f} s; wrote {out}/results.json and gradient_flow.png")


if __name__ == "__main__":
    main()
