"""SyncBN where it matters: segmentation at 1, 2 and 4 images per rank. Drives train.py.

``task=segmentation`` (digit scenes, the DeepLab-style model with ASPP and image pooling) on W
ranks (2 and 4) at per-rank batches b (1, 2, 4), each with

- ``syncbn``: every BN layer normalizes over the global batch of W x b images;
- ``bn``: per-rank BatchNorm over b images. At b = 1 the image-pooling branch's BN would see one
  value per channel and cannot train (``nn.BatchNorm2d`` raises; train.py refuses the config):
  there this run drops that one norm layer (``model.image_pool_norm=false``), the way
  detectron2's DeepLab always does;
- ``bn, no pool norm`` and ``syncbn, no pool norm``: ``model.image_pool_norm=false`` at every
  b, to tell the image-pooling branch's failure from per-rank BN's noise elsewhere;
- ``none``: no normalization layers;
- ``bn, 1 process``: one process with BN over the global batch W x b: what SyncBN must match
  (runs of equal global batch are shared between the two world sizes).

Same steps, learning rate and data order for all; several seeds; mean +- std of the final
validation mean IoU (and pixel accuracy). Each run's directory holds its metrics.json: finished
runs are skipped and an interrupted one resumes from its checkpoint, so the script can be stopped
and restarted. Writes ``<out>/results.json`` and ``<out>/compare_seg.png``::

    python scripts/experiments/compare_seg.py            # 96 runs; ~45 min on 2 shared CPU cores
    python scripts/experiments/compare_seg.py --quick            # smoke test: 1 seed, few steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from sweep import json_safe, mean_std, run_train  # scripts/experiments/sweep.py, beside this file

ROOT = Path(__file__).resolve().parents[2]
SYNCBN, SYNC_NO_POOL, BN, BN_NO_POOL, NONE, REFERENCE = (
    "syncbn", "syncbn, no pool norm", "bn", "bn, no pool norm", "none",
    "bn, 1 process, global batch",
)  # fmt: skip
LABELS = (SYNCBN, SYNC_NO_POOL, BN, BN_NO_POOL, NONE, REFERENCE)
NO_POOL_NORM = "model.image_pool_norm=false"


@dataclass(frozen=True)
class Run:
    label: str
    norm: str
    world_size: int
    batch_size: int  # per rank
    seed: int
    overrides: tuple[str, ...] = field(default=())

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def name(self) -> str:
        pool = "_nopoolnorm" if NO_POOL_NORM in self.overrides else ""
        return f"{self.norm}{pool}_w{self.world_size}_b{self.batch_size}_s{self.seed}"


def plan(args) -> list[Run]:
    """Every run of the sweep, deduplicated (references of equal global batch are one run)."""
    runs: dict[str, Run] = {}
    for seed in range(args.seeds):
        for w in args.world_sizes:
            for b in args.batch_sizes:
                bn_pool = (NO_POOL_NORM,) if b == 1 else ()  # b = 1: the only way BN trains
                for run in (
                    Run(SYNCBN, "syncbn", w, b, seed),
                    Run(SYNC_NO_POOL, "syncbn", w, b, seed, (NO_POOL_NORM,)),
                    Run(BN, "bn", w, b, seed, bn_pool),
                    Run(BN_NO_POOL, "bn", w, b, seed, (NO_POOL_NORM,)),
                    Run(NONE, "none", w, b, seed),
                    Run(REFERENCE, "bn", 1, w * b, seed),
                ):
                    runs.setdefault(run.name, run)
    return list(runs.values())


def launch(run: Run, out: Path, args) -> dict:
    """Run train.py for ``run`` (resuming if interrupted) and return its metrics.json."""
    return run_train(out / "runs" / run.name, run.world_size, [
        "task=segmentation", f"norm={run.norm}", f"trainer.batch_size={run.batch_size}",
        f"trainer.max_steps={args.steps}", f"trainer.eval_every_steps={args.eval_every}",
        f"trainer.ckpt_every_steps={args.eval_every}", f"seed={run.seed}", *run.overrides,
    ])  # fmt: skip


def summarize(records: list[dict], world_sizes: list[int], batch_sizes: list[int]) -> list[dict]:
    """Mean and spread over seeds for each (world size, per-rank batch, label); the references
    appear under every (W, b) whose global batch they have."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["label"] == BN and NO_POOL_NORM in r["overrides"]:  # b = 1: one run, two labels
            groups.setdefault((r["world_size"], r["batch_size"], BN_NO_POOL), []).append(r)
        if r["label"] == REFERENCE:
            for w in world_sizes:
                if r["global_batch"] % w == 0 and r["global_batch"] // w in batch_sizes:
                    key = (w, r["global_batch"] // w, REFERENCE)
                    groups.setdefault(key, []).append(r)
        else:
            groups.setdefault((r["world_size"], r["batch_size"], r["label"]), []).append(r)
    summary = []
    for (w, b, label), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], LABELS.index(kv[0][2]))
    ):
        summary.append({
            "world_size": w, "batch_size": b, "label": label,
            "image_pool_norm": all(NO_POOL_NORM not in r["overrides"] for r in rs),
            "val_miou": mean_std([r["val_miou"] for r in rs]),
            "val_acc": mean_std([r["val_acc"] for r in rs]),
            "val_loss": mean_std([r["val_loss"] for r in rs]),
            "train_loss_end": mean_std([r["train_loss_end"] for r in rs]),
            "seeds": [r["seed"] for r in rs],
        })  # fmt: skip
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {SYNCBN: "tab:blue", SYNC_NO_POOL: "tab:cyan", BN: "tab:orange",
              BN_NO_POOL: "tab:red", NONE: "tab:gray", REFERENCE: "black"}  # fmt: skip
    styles = {REFERENCE: "--", BN_NO_POOL: ":", SYNC_NO_POOL: ":"}
    worlds = report["world_sizes"]
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.2 * len(worlds), 4.2), squeeze=False)
    for ax, w in zip(axes[0], worlds, strict=True):
        for label in LABELS:
            gs = [g for g in report["summary"] if g["world_size"] == w and g["label"] == label]
            gs = [g for g in gs if g["val_miou"]["mean"] is not None]
            if not gs:
                continue
            offset = (LABELS.index(label) - 2.5) * 0.035  # keep error bars apart
            ax.errorbar(
                [g["batch_size"] * (1 + offset) for g in gs],
                [g["val_miou"]["mean"] for g in gs],
                yerr=[g["val_miou"]["std"] for g in gs],
                marker="o", capsize=3, color=colors[label], linestyle=styles.get(label, "-"),
                label=label,
            )  # fmt: skip
            for g in gs:  # a hollow marker: bn at b=1 had to drop the image-pooling norm
                if label == BN and not g["image_pool_norm"]:
                    ax.plot(g["batch_size"] * (1 + offset), g["val_miou"]["mean"], "o",
                            markersize=11, markerfacecolor="none", color=colors[BN])  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["batch_sizes"], [str(b) for b in report["batch_sizes"]])
        ax.set_xlabel("images per rank")
        ax.set_ylabel("validation mean IoU")
        ax.set_title(f"{w} ranks (global batch {w} x images per rank)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"digit scenes segmentation, DeepLab-style with ASPP image pooling: {report['steps']} "
        f"steps, {report['seeds']} seeds, mean ± std ({report['date']}; circled: bn without "
        f"the image-pooling norm)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(report: dict) -> str:
    def cell(stat: dict) -> str:
        if stat["mean"] is None:
            return f"diverged ({stat['diverged']}/{stat['n']})"
        text = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
        return text + (f" ({stat['diverged']}/{stat['n']} diverged)" if stat["diverged"] else "")

    lines = [
        "| ranks | images per rank | " + " | ".join(LABELS) + " |",
        "|---|---|" + "---|" * len(LABELS),
    ]
    for w in report["world_sizes"]:
        for b in report["batch_sizes"]:
            cells = []
            for label in LABELS:
                key = (w, b, label)
                gs = [g for g in report["summary"]
                      if (g["world_size"], g["batch_size"], g["label"]) == key]  # fmt: skip
                cells.append(cell(gs[0]["val_miou"]) + ("*" if label == BN and b == 1 else "")
                             if gs else "")  # fmt: skip
            lines.append(f"| {w} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/compare_seg")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 steps, 2 ranks, b=1,2")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every = 1, 6, 3
        args.world_sizes, args.batch_sizes = [2], [1, 2]

    out = Path(args.out)
    runs = plan(args)
    records = []
    started = time.perf_counter()
    for i, run in enumerate(runs, 1):
        metrics = launch(run, out, args)
        records.append({
            "name": run.name, "label": run.label, "norm": run.norm,
            "world_size": run.world_size, "batch_size": run.batch_size,
            "global_batch": run.global_batch, "seed": run.seed, "overrides": list(run.overrides),
            **{k: metrics[k] for k in ("val_miou", "val_acc", "val_loss", "val_iou",
                                       "wall_time_s")},
            "train_loss_end": metrics["train_loss_history"][-1],
            "val_history": metrics["val_history"],
        })  # fmt: skip
        print(f"[{i}/{len(runs)}] {run.name}: val_miou {metrics['val_miou']:.3f} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)  # fmt: skip
    report = {
        "date": date.today().isoformat(),
        "command": " ".join(["python", "scripts/experiments/compare_seg.py", *sys.argv[1:]]),
        "world_sizes": args.world_sizes,
        "batch_sizes": args.batch_sizes,
        "steps": args.steps,
        "seeds": args.seeds,
        "wall_time_s": time.perf_counter() - started,  # this invocation; finished runs reused
        "runs": records,
    }
    report["summary"] = summarize(records, args.world_sizes, args.batch_sizes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(report), indent=2))
    plot(report, out / "compare_seg.png")
    print(format_table(report))


if __name__ == "__main__":
    main()
