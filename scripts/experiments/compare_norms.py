"""Do BN's and SyncBN's claimed benefits show up in our own runs? Drives train.py under torchrun.

Experiments, on digits (``--data cifar10`` when the user has it locally), each over several seeds:

- ``batch``: ``norm=none``, ``norm=bn`` (per-rank statistics) and ``norm=syncbn`` on W ranks at
  per-rank batches 2, 4, 8, and the single-process reference: ``norm=bn`` on one rank with the
  whole global batch (what SyncBN should reproduce). Recorded: validation accuracy and loss
  against steps (convergence speed), final accuracy, and the generalization gap
  (validation loss minus the loss on the un-augmented training set, at the end);
- ``init``: sensitivity to the initialization scale (``model.init_scale``), per norm;
- ``lr``: sensitivity to the learning rate (``optim.lr``), per norm.

Every run has a fixed step budget, so the norms see the same samples. A run's directory holds its
``metrics.json``; runs already done are skipped, and an interrupted run resumes from its last
checkpoint (``trainer.resume=auto``), so the script can be stopped and restarted. Writes
``<out>/results.json`` (every run and the aggregates) and ``<out>/compare_norms.png``::

    python scripts/experiments/compare_norms.py          # 72 runs, about 10 minutes on 2 CPU cores
    python scripts/experiments/compare_norms.py --quick          # smoke test: one seed, few steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from sweep import json_safe, mean_std, run_train  # scripts/experiments/sweep.py, beside this file

ROOT = Path(__file__).resolve().parents[2]
NORMS = ("none", "bn", "syncbn")
REFERENCE = "bn, 1 rank, global batch"
DEFAULTS = {"model.init_scale=1.0", "optim.lr=0.1"}  # conf/ defaults: no override needed


@dataclass(frozen=True)
class Run:
    experiment: str
    norm: str
    world_size: int
    batch_size: int  # per rank
    seed: int
    overrides: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return REFERENCE if self.world_size == 1 else self.norm

    @property
    def name(self) -> str:
        """The run directory: equal configurations share one (a sweep's default point is the
        batch experiment's run), whatever experiment asks for them."""
        extra = "_".join(
            o.split(".")[-1].replace("=", "") for o in self.overrides if o not in DEFAULTS
        )
        return (
            f"{self.norm}_w{self.world_size}_b{self.batch_size}"
            f"{'_' + extra if extra else ''}_s{self.seed}"
        )


def plan(args) -> list[Run]:
    seeds = range(args.seeds)
    runs = []
    for b in args.batch_sizes:
        for seed in seeds:
            runs += [Run("batch", norm, args.world_size, b, seed) for norm in NORMS]
            runs.append(Run("batch", "bn", 1, b * args.world_size, seed))
    sweep_seeds = range(min(args.seeds, 2))
    for scale in args.init_scales:
        for seed in sweep_seeds:
            runs += [
                Run(
                    "init",
                    n,
                    args.world_size,
                    args.sweep_batch,
                    seed,
                    (f"model.init_scale={scale}",),
                )
                for n in NORMS
            ]
    for lr in args.lrs:
        for seed in sweep_seeds:
            runs += [
                Run("lr", n, args.world_size, args.sweep_batch, seed, (f"optim.lr={lr}",))
                for n in NORMS
            ]
    return runs


def launch(run: Run, out: Path, args) -> dict:
    """Run train.py for ``run`` (resuming if interrupted) and return its metrics.json."""
    return run_train(out / "runs" / run.name, run.world_size, [
        f"norm={run.norm}", f"data={args.data}", f"trainer.batch_size={run.batch_size}",
        f"trainer.max_steps={args.steps}", f"trainer.eval_every_steps={args.eval_every}",
        "trainer.eval_train=true", f"seed={run.seed}", *run.overrides,
    ])  # fmt: skip


def summarize(records: list[dict]) -> dict:
    """Mean and spread over seeds, per experiment and setting."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        setting = r["batch_size"] if r["experiment"] == "batch" else r["overrides"][0]
        if r["experiment"] == "batch" and r["world_size"] == 1:
            setting = r["batch_size"] // r["world_size_of_experiment"]
        groups.setdefault((r["experiment"], r["label"], setting), []).append(r)
    summary = []
    for (experiment, label, setting), rs in sorted(groups.items(), key=str):
        steps = [p["step"] for p in rs[0]["val_history"]]
        curves = [[p["acc"] for p in r["val_history"]] for r in rs]
        summary.append(
            {
                "experiment": experiment,
                "label": label,
                "setting": setting,
                "val_acc": mean_std([r["val_acc"] for r in rs]),
                "val_loss": mean_std([r["val_loss"] for r in rs]),
                "gap": mean_std([r["val_loss"] - r["train_loss"] for r in rs]),
                "train_acc": mean_std([r["train_acc"] for r in rs]),
                "curve_steps": steps,
                "curve_acc_mean": [statistics.fmean(c) for c in zip(*curves, strict=True)],
                "curve_acc_std": [
                    statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*curves, strict=True)
                ],
            }
        )
    return {"groups": summary}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report["summary"]["groups"]
    batch_sizes = sorted({g["setting"] for g in groups if g["experiment"] == "batch"})
    labels = [*NORMS, REFERENCE]
    colors = dict(zip(labels, ["tab:gray", "tab:orange", "tab:blue", "black"], strict=True))
    styles = {REFERENCE: "--"}
    ncols = max(3, len(batch_sizes))
    fig, axes = plt.subplots(2, ncols, figsize=(4.2 * ncols, 7.4), squeeze=False)

    for ax, b in zip(axes[0], batch_sizes, strict=False):
        for g in groups:
            if g["experiment"] == "batch" and g["setting"] == b:
                mean, std = g["curve_acc_mean"], g["curve_acc_std"]
                lo = [m - s for m, s in zip(mean, std, strict=True)]
                hi = [m + s for m, s in zip(mean, std, strict=True)]
                ax.plot(g["curve_steps"], mean, styles.get(g["label"], "-"),
                        color=colors[g["label"]], label=g["label"])  # fmt: skip
                ax.fill_between(g["curve_steps"], lo, hi, color=colors[g["label"]], alpha=0.15)
        ax.set_title(f"per-rank batch {b} x {report['world_size']} ranks")
        ax.set_xlabel("step")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)

    def setting_plot(ax, experiment, title, xlabel, metric="val_acc", log=False):
        for label in labels:
            gs = [g for g in groups if g["experiment"] == experiment and g["label"] == label]
            if not gs:
                continue
            gs = [g for g in gs if g[metric]["mean"] is not None]  # every seed diverged
            xs = [_setting_value(g["setting"]) for g in gs]
            order = sorted(range(len(xs)), key=xs.__getitem__)
            ax.errorbar(
                [xs[i] for i in order],
                [gs[i][metric]["mean"] for i in order],
                yerr=[gs[i][metric]["std"] for i in order],
                marker="o",
                capsize=3,
                linestyle=styles.get(label, "-"),
                color=colors[label],
                label=label,
            )
        if log:
            ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(
            {"val_acc": "final validation accuracy", "gap": "val loss - train loss"}[metric]
        )
        ax.grid(alpha=0.3)

    setting_plot(axes[1][0], "batch", "generalization gap (end)", "per-rank batch", "gap", True)
    setting_plot(axes[1][1], "init", "sensitivity to init scale", "model.init_scale", log=True)
    setting_plot(axes[1][2], "lr", "sensitivity to learning rate", "optim.lr", log=True)
    for ax in axes[1][3:]:
        ax.axis("off")
    for ax in axes[0][len(batch_sizes) :]:
        ax.axis("off")
    fig.suptitle(
        f"{report['data']}: {report['steps']} steps, {report['world_size']} ranks, "
        f"{report['seeds']} seeds ({min(report['seeds'], 2)} in the sweeps), mean ± std, "
        f"{report['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _setting_value(setting) -> float:
    return float(setting.split("=")[1]) if isinstance(setting, str) else float(setting)


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return f"diverged ({stat['diverged']}/{stat['n']})"
    text = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    return text + (f" ({stat['diverged']}/{stat['n']} diverged)" if stat["diverged"] else "")


def format_table(report: dict) -> str:
    lines = [
        "| experiment | setting | norm | final val acc | val loss | gap (val - train loss) |",
        "|---|---|---|---|---|---|",
    ]
    for g in report["summary"]["groups"]:
        cells = [_cell(g[k]) for k in ("val_acc", "val_loss", "gap")]
        lines.append(
            f"| {g['experiment']} | {g['setting']} | {g['label']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/compare_norms")
    parser.add_argument("--data", default="digits", help="digits | cifar10 (needs local files)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--sweep-batch", type=int, default=4, help="per-rank batch of sweeps")
    parser.add_argument(
        "--init-scales",
        type=float,
        nargs="*",
        default=[0.25, 1.0, 4.0],
        help="none: skip this sweep",
    )
    parser.add_argument(
        "--lrs", type=float, nargs="*", default=[0.02, 0.1, 0.5], help="none: skip this sweep"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 steps, small sweeps")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every = 1, 40, 20
        args.batch_sizes, args.init_scales, args.lrs = [4], [1.0], [0.1]

    out = Path(args.out)
    runs = plan(args)
    records = []
    started = time.perf_counter()
    for i, run in enumerate(runs, 1):
        metrics = launch(run, out, args)
        records.append(
            {
                "name": run.name,
                "experiment": run.experiment,
                "label": run.label,
                "norm": run.norm,
                "world_size": run.world_size,
                "world_size_of_experiment": args.world_size,
                "batch_size": run.batch_size,
                "seed": run.seed,
                "overrides": list(run.overrides),
                **{k: metrics[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss")},
                "val_history": metrics["val_history"],
            }
        )
        print(f"[{i}/{len(runs)}] {run.name}: val_acc {metrics['val_acc']:.3f} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)  # fmt: skip
    report = {
        "date": date.today().isoformat(),
        "data": args.data,
        "world_size": args.world_size,
        "steps": args.steps,
        "seeds": args.seeds,
        "command": " ".join(["python", "scripts/experiments/compare_norms.py", *sys.argv[1:]]),
        "wall_time_s": time.perf_counter() - started,  # this invocation; finished runs are reused
        "runs": records,
    }
    report["summary"] = summarize(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(report), indent=2))
    plot(report, out / "compare_norms.png")
    print(format_table(report))


if __name__ == "__main__":
    main()
