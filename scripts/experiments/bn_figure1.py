"""Figure 1 of Ioffe & Szegedy (2015, section 4.1) on digits, with SyncBN on 2 ranks.

The paper's network: 3 fully-connected hidden layers of 100 sigmoid units, batch 60, small
random Gaussian initial weights, trained with and without BN (BN before each sigmoid). The
paper trained on MNIST for 50000 steps; here it is scikit-learn's digits (64 pixels scaled to
[0, 1], 1437 train / 360 test) for ``--steps`` steps. Configurations, all on the same global
batches of 60 for a seed (rank ``r`` of 2 takes the ``r``-th half of each):

- ``no BN, 1 x 60`` and ``no BN, 2 x 30`` (DDP; the same computation, up to round-off);
- ``SyncBN, 2 x 30``: the BN curve: 2 gloo ranks, statistics of the global batch of 60;
- ``BN, 1 x 60``: ``nn.BatchNorm1d`` in one process, what SyncBN should reproduce;
- ``per-rank BN, 2 x 30``: ``nn.BatchNorm1d`` under DDP, statistics of each rank's 30.

Every ``--eval-every`` steps, in eval mode (BN with its running statistics) on the test set:
(a) test accuracy; (b, c) the 15th, 50th and 85th percentiles of the input of each sigmoid of
the last hidden layer (the BN output with BN, the linear output without), over the 360 test
images. Panels (b, c) plot unit ``--unit`` (fixed before looking) of seed 0, as the paper plots
"a typical sigmoid"; the drift of *every* unit is summarized in ``results.json``:
:math:`\\text{drift}_u = (\\max_t p_{50} - \\min_t p_{50}) / \\overline{(p_{85} - p_{15})}`, how far
the median moves over training in units of the distribution's mean 15-85 width, and the same
from 10% of training on (``late_drift``), reported as the median over the 100 units. Writes
``<out>/results.json`` and ``<out>/bn_figure1.png``::

    python scripts/experiments/bn_figure1.py          # 5 configurations x 3 seeds, a few minutes
    python scripts/experiments/bn_figure1.py --quick             # smoke test: 1 seed, 30 steps
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mlplib import (
    finish_group,
    global_batches,
    init_group,
    load_digits,
    mean_min_max,
    mlp,
    rank_slice,
    rounded,
    spawn,
    write_json,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from syncbn.testing.bench import machine

PERCENTILES = (0.15, 0.50, 0.85)
HIDDEN = [100, 100, 100]


@dataclass(frozen=True)
class Config:
    key: str  # for --configs
    label: str
    norm: str  # none | bn | syncbn
    world_size: int
    batch_size: int  # per rank


CONFIGS = (
    Config("none-1x60", "no BN, 1 x 60", "none", 1, 60),
    Config("none-2x30", "no BN, 2 x 30", "none", 2, 30),
    Config("syncbn-2x30", "SyncBN, 2 x 30", "syncbn", 2, 30),
    Config("bn-1x60", "BN, 1 x 60", "bn", 1, 60),
    Config("bn-2x30", "per-rank BN, 2 x 30", "bn", 2, 30),
)
NO_BN_PANEL = ("no BN, 1 x 60", "no BN, 2 x 30")  # (b) plots the first one that ran
BN_PANEL = ("SyncBN, 2 x 30", "BN, 1 x 60", "per-rank BN, 2 x 30")  # (c) likewise
STYLE = {
    "no BN, 1 x 60": ("tab:gray", "-"),
    "no BN, 2 x 30": ("black", ":"),
    "SyncBN, 2 x 30": ("tab:blue", "-"),
    "BN, 1 x 60": ("tab:red", "--"),
    "per-rank BN, 2 x 30": ("tab:orange", "-."),
}


def train_one(config: Config, seed: int, args, data, rank: int) -> dict:
    """Train one configuration (on every rank of its group); return rank 0's record."""
    torch.manual_seed(seed)
    model = mlp([64, *HIDDEN, 10], config.norm, "sigmoid", init_std=args.init_std)
    net = (
        DistributedDataParallel(model, forward_sync_buffers=False)  # buffers are per rank
        if config.world_size > 1
        else model
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    last_sigmoid = [m for m in model if isinstance(m, nn.Sigmoid)][-1]
    captured = {}
    last_sigmoid.register_forward_hook(lambda _m, inputs, _o: captured.update(x=inputs[0]))
    record = {**asdict(config), "seed": seed, "steps": [], "test_acc": [], "loss": []}
    record["percentiles"] = []  # per eval point: (3, 100) = percentile x unit
    started = time.perf_counter()
    batches = global_batches(
        len(data.x_train), config.batch_size * config.world_size, args.steps, seed
    )
    for step, indices in enumerate(batches):
        if step % args.eval_every == 0:
            _evaluate(model, data, captured, record, step)
        local = rank_slice(indices, rank, config.world_size)
        loss = F.cross_entropy(net(data.x_train[local]), data.y_train[local])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record["loss"].append(loss.item())  # this rank's half; averaged below
    _evaluate(model, data, captured, record, args.steps)
    if config.world_size > 1:  # the global batch's loss: mean of the ranks' means
        losses = torch.tensor(record["loss"], dtype=torch.float64)
        dist.all_reduce(losses)
        record["loss"] = (losses / config.world_size).tolist()
    record["train_s"] = round(time.perf_counter() - started, 2)
    return record


@torch.no_grad()
def _evaluate(model, data, captured, record, step: int) -> None:
    model.eval()
    correct = model(data.x_test).argmax(1) == data.y_test
    model.train()
    q = torch.quantile(captured["x"], torch.tensor(PERCENTILES), dim=0)  # (3, 100)
    record["steps"].append(step)
    record["test_acc"].append(correct.float().mean().item())
    record["percentiles"].append(q.tolist())


def drift(percentiles: list, start: int = 0) -> list[float]:
    """Per unit: range of the median over eval points ``start:``, over the mean 15-85 width."""
    p = torch.tensor(percentiles)[start:]  # (T, 3, units)
    median = p[:, 1]
    width = (p[:, 2] - p[:, 0]).mean(0)
    return ((median.max(0).values - median.min(0).values) / width).tolist()


def _rank(rank: int, world_size: int, init_file: str, args) -> list[dict]:
    init_group(rank, world_size, init_file)
    data = load_digits()
    records = []
    for seed in range(args.seeds):
        for config in _selected(args):
            if config.world_size == world_size:
                records.append(train_one(config, seed, args, data, rank))
                if rank == 0:
                    _progress(records[-1])
    finish_group()
    return records


def _progress(r: dict) -> None:
    print(f"seed {r['seed']} {r['label']:>20}: {r['train_s']:.1f} s, test acc "
          f"{r['test_acc'][-1]:.3f}", flush=True)  # fmt: skip


def run_all(args) -> list[dict]:
    """The one-process configurations here, the two-rank ones on 2 spawned gloo ranks."""
    torch.set_num_threads(1)
    data = load_digits()
    records = []
    for seed in range(args.seeds):
        for config in _selected(args):
            if config.world_size == 1:
                records.append(train_one(config, seed, args, data, rank=0))
                _progress(records[-1])
    if any(c.world_size == 2 for c in _selected(args)):
        records += spawn(_rank, 2, args)
    return records


def _selected(args) -> list[Config]:
    return [c for c in CONFIGS if c.key in args.configs]


def _reduce(record: dict, args) -> None:
    """What results.json keeps of a run: drift of every unit, the plotted unit's percentiles,
    and the training loss averaged over each interval between evaluations."""
    late = max(1, len(record["steps"]) // 10)
    percentiles = record.pop("percentiles")
    record["drift"] = rounded(drift(percentiles), 4)
    record["late_drift"] = rounded(drift(percentiles, late), 4)
    record["late_from_step"] = record["steps"][late]
    record["unit_percentiles"] = rounded([[q[args.unit] for q in p] for p in percentiles], 4)
    loss, every = record.pop("loss"), args.eval_every
    record["train_loss"] = rounded(
        [statistics.fmean(loss[i : i + every]) for i in range(0, len(loss), every)]
    )
    record["test_acc"] = rounded(record["test_acc"])


def summarize(records: list[dict], args) -> dict:
    summary = {}
    for config in _selected(args):
        rs = [r for r in records if r["label"] == config.label]
        accs = list(zip(*[r["test_acc"] for r in rs], strict=True))
        steps = rs[0]["steps"]
        summary[config.label] = {
            "final_test_acc": mean_min_max([r["test_acc"][-1] for r in rs]),
            "test_acc_mean": rounded([statistics.fmean(a) for a in accs]),
            "steps_to_acc": {
                str(t): _first_step(steps, [statistics.fmean(a) for a in accs], t)
                for t in args.acc_thresholds
            },
            "drift_median_over_units": mean_min_max([statistics.median(r["drift"]) for r in rs]),
            "late_drift_median_over_units": mean_min_max(
                [statistics.median(r["late_drift"]) for r in rs]
            ),
            "late_from_step": rs[0]["late_from_step"],
            "train_s": mean_min_max([r["train_s"] for r in rs]),
        }
    return summary


def _first_step(steps: list[int], acc: list[float], threshold: float) -> int | None:
    """First eval step at which the seed-mean test accuracy reaches ``threshold``."""
    return next((s for s, a in zip(steps, acc, strict=True) if a >= threshold), None)


def agreement(records: list[dict]) -> dict:
    """How far SyncBN on 2 x 30 is from BN on 1 x 60 (and the two no-BN runs from each other):
    largest difference in per-step training loss over the first 100 steps and over all, and in
    final test accuracy, across seeds. Equal up to round-off is what SyncBN promises."""
    out = {}
    labels = {r["label"] for r in records}
    for a, b in (
        ("SyncBN, 2 x 30", "BN, 1 x 60"),
        ("no BN, 2 x 30", "no BN, 1 x 60"),
        ("per-rank BN, 2 x 30", "BN, 1 x 60"),  # differs: statistics of 30, not 60
    ):
        if not {a, b} <= labels:
            continue
        diffs = []
        for seed in {r["seed"] for r in records}:
            ra = next(r for r in records if r["label"] == a and r["seed"] == seed)
            rb = next(r for r in records if r["label"] == b and r["seed"] == seed)
            d = [abs(x - y) for x, y in zip(ra["loss"], rb["loss"], strict=True)]
            diffs.append((max(d[:100]), max(d), abs(ra["test_acc"][-1] - rb["test_acc"][-1])))
        out[f"{a} vs {b}"] = {
            "max_loss_diff_first_100_steps": max(d[0] for d in diffs),
            "max_loss_diff_all_steps": max(d[1] for d in diffs),
            "max_final_acc_diff": max(d[2] for d in diffs),
        }
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, unit = report["runs"], report["unit"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for label, s in report["summary"].items():
        steps = next(r["steps"] for r in records if r["label"] == label)
        color, ls = STYLE[label]
        ax.plot(steps, s["test_acc_mean"], ls, color=color, label=label)
    ax.set_title(f"(a) test accuracy (mean of {report['seeds']} seeds)")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)

    lo, hi = float("inf"), float("-inf")
    ran = {r["label"] for r in records}
    for ax, candidates, title in ((axes[1], NO_BN_PANEL, "(b)"), (axes[2], BN_PANEL, "(c)")):
        label = next((c for c in candidates if c in ran), None)
        if label is None:
            ax.set_axis_off()
            continue
        r = next(r for r in records if r["label"] == label and r["seed"] == 0)
        for k, (p, shade) in enumerate(zip(PERCENTILES, ("0.55", "0.0", "0.55"), strict=True)):
            values = [point[k] for point in r["unit_percentiles"]]
            lo, hi = min(lo, *values), max(hi, *values)
            ax.plot(r["steps"], values, color=shade, label=f"{round(p * 100)}th percentile")
        ax.set_title(f"{title} {label}: sigmoid {unit} of the last hidden layer", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("sigmoid input: 15/50/85th pct. over the test set")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1:]:
        if lo < hi:
            ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    fig.suptitle(
        f"Ioffe & Szegedy 2015, Fig. 1, on digits: 3 x 100 sigmoid, batch 60, SGD lr "
        f"{report['lr']}, init N(0, {report['init_std']}²), {report['steps']} steps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--init-std", type=float, default=0.1, help="weights ~ N(0, std^2)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--unit", type=int, default=0, help="sigmoid plotted in (b, c)")
    parser.add_argument("--acc-thresholds", type=float, nargs="+", default=[0.9, 0.95])
    keys = [c.key for c in CONFIGS]
    parser.add_argument("--configs", nargs="+", choices=keys, default=keys, help="default: all")
    parser.add_argument("--out", default="results/bn_figure1")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 30 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every = 1, 30, 10
    if not 0 <= args.unit < HIDDEN[-1]:
        parser.error(f"--unit expected a sigmoid in [0, {HIDDEN[-1]}) (got {args.unit})")
    if args.steps < args.eval_every:
        parser.error(f"--steps expected at least --eval-every {args.eval_every} (got {args.steps})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    records = run_all(args)
    wall_s = time.perf_counter() - started
    agree = agreement(records)  # before rounding
    for r in records:
        _reduce(r, args)
    report = {
        **machine("cpu", 2),
        "command": " ".join(["python scripts/experiments/bn_figure1.py", *(argv or sys.argv[1:])]),
        "wall_time_s": round(wall_s, 1),
        **{k: v for k, v in vars(args).items() if k not in ("out", "quick")},
        "hidden": HIDDEN,
        "percentiles": PERCENTILES,
        "summary": summarize(records, args),
        "agreement": agree,
        "runs": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", report)
    plot(report, out / "bn_figure1.png")
    for label, s in report["summary"].items():
        acc, d = s["final_test_acc"], s["late_drift_median_over_units"]
        print(f"{label:>20}: final test acc {acc['mean']:.3f} [{acc['min']:.3f}, {acc['max']:.3f}]"
              f", steps to {s['steps_to_acc']}, late drift {d['mean']:.3f}")  # fmt: skip
    for pair, a in report["agreement"].items():
        print(f"{pair}: {a}")
    print(f"wall time {wall_s:.1f} s; wrote {out}/results.json and bn_figure1.png")


if __name__ == "__main__":
    main()
