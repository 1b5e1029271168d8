"""What a run tells the world: metrics.json, the log lines rank 0 prints, the W&B calls, BN
telemetry and the non-finite and preemption messages. Nothing here decides anything; the loop
(:mod:`syncbn.training.loop`) calls these when it has something to say.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .parts import Run
from .steplog import StepRecord

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    exit_code: int  # syncbn.training.lifecycle.exit_codes
    metrics: dict = field(default_factory=dict)  # what rank 0 wrote to metrics.json
    objective: float | None = None  # the task's primary validation metric (Hydra sweepers)


def scalars(metrics: dict) -> dict[str, float]:
    """The metrics that are one number (not the count, not per-class lists)."""
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader (or a kill mid-write) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def train_step(run: Run, record: StepRecord) -> None:
    """A synced step's loss: into the history, and to W&B every ``trainer.log_every`` steps."""
    run.state.train_loss_history.append(record.loss)
    if record.step % run.parts.cfg.trainer.log_every == 0:
        metrics = {"train/loss": record.loss, "train/lr": record.lr, "epoch": run.state.epoch}
        run.logger.log(metrics, step=record.step)


def validation(run: Run, val: dict) -> None:
    """An evaluation: into the run's validation history and to W&B."""
    state = run.state
    state.val_history.append({"step": state.step, **scalars(val)})
    run.logger.log({f"val/{k}": v for k, v in scalars(val).items()} | {"epoch": state.epoch},
                   state.step)  # fmt: skip


def epoch_line(run: Run, val: dict) -> None:
    parts, state = run.parts, run.state
    if parts.env.is_main:
        primary = f"{parts.task.primary}_ema"
        log.info(
            "epoch %d step %d: train_loss %.4f val_loss %.4f %s%s",
            state.epoch,
            state.step,
            state.train_loss_history[-1] if state.train_loss_history else math.nan,
            val["loss"],
            parts.task.describe(val),
            f" (with EMA statistics {parts.task.primary} {val[primary]:.4f})"
            if primary in val
            else "",
        )


def telemetry(run: Run) -> None:
    """Collect BN telemetry (a collective: every rank, the same steps) and record it."""
    parts, state = run.parts, run.state
    metrics = parts.telemetry.collect()
    if not metrics:
        return
    state.bn_telemetry.append({"step": state.step, **metrics})
    run.logger.log(metrics, step=state.step)
    if parts.env.is_main:
        log.info("step %d: %s", state.step, parts.telemetry.summary(metrics))


def nonfinite_what(record: StepRecord) -> str:
    """What was not finite at a step: its loss, or (a finite loss) its gradients."""
    if math.isfinite(record.loss):
        return f"non-finite gradients (loss {record.loss})"
    return f"non-finite loss {record.loss}"


def nonfinite_skipped(record: StepRecord) -> None:
    if not record.skipped:  # cannot happen with a NaN loss; an infinite loss, finite gradients
        log.warning("step %d: loss %s with finite gradients: update applied", record.step,
                    record.loss)  # fmt: skip
        return
    log.warning("step %d: %s: update skipped (trainer.nonfinite=skip)", record.step,
                nonfinite_what(record))  # fmt: skip


def nonfinite_stop(run: Run, record: StepRecord) -> None:
    parts, trainer = run.parts, run.parts.cfg.trainer
    if parts.env.is_main:
        why = (
            "trainer.nonfinite=stop"
            if trainer.nonfinite == "stop"
            else f"{run.skips_in_a_row} in a row > trainer.max_consecutive_skips"
        )
        log.error(
            "step %d: %s; stopping (%s) at step %d. The newest checkpoint, %s, "
            "is the last finite state; lower optim.lr, set trainer.grad_clip, or "
            "trainer.nonfinite=skip",
            run.nonfinite_step,
            nonfinite_what(record)
            if record.step == run.nonfinite_step
            else f"non-finite steps {run.nonfinite_step}-{record.step} (the last: "
            f"{nonfinite_what(record)})",
            why,
            run.state.step,
            _last_checkpoint(run, "none yet"),
        )


def nonfinite_parameters(run: Run, records: list[StepRecord]) -> None:
    """The parameters are NaN/Inf after the last of ``records`` (an update with finite
    gradients overflowed: the skip guard, which checks gradients, lets it through)."""
    if run.parts.env.is_main:
        first, last = records[0].step, records[-1].step
        steps = f"step {first}" if first == last else f"one of steps {first}-{last}"
        log.error(
            "non-finite parameters after step %d: the update of %s overflowed the weights "
            "(finite loss and gradients); stopping. The newest checkpoint, %s, is the last "
            "finite state; lower optim.lr or set trainer.grad_clip",
            last,
            steps,
            _last_checkpoint(run, "none yet"),
        )


def nonfinite_model(run: Run) -> None:
    log.error(
        "step %d: the model holds non-finite values: not writing a checkpoint (the last "
        "good one is %s)",
        run.state.step,
        _last_checkpoint(run, "none"),
    )


def preempted(run: Run, saved: bool) -> None:
    if run.parts.env.is_main:
        state = run.state
        log.warning(
            "preempted at step %d (epoch %d, sample %d): %s; relaunch with trainer.resume=auto "
            "to continue",
            state.step,
            state.epoch,
            state.samples,
            f"checkpoint {run.parts.ckpts.last}" if saved else "no checkpoint (non-finite model)",
        )


def preempted_at_start(run: Run) -> None:
    """A stop signal arrived during start-up: the run stops before its first step."""
    if run.parts.env.is_main:
        last = run.parts.ckpts.last
        log.warning(
            "preempted before the first step (step %d, sample %d): %s; relaunch with "
            "trainer.resume=auto to continue",
            run.state.step,
            run.state.samples,
            f"nothing new to save, {last} holds this step" if last.is_file() else "nothing to save",
        )


def _last_checkpoint(run: Run, none: str):
    last = run.parts.ckpts.last
    return last if last.is_file() else none


def final_metrics(run: Run, val: dict, train: dict | None) -> dict:
    """metrics.json of a training run: the last evaluation, progress, histories, best."""
    parts, state = run.parts, run.state
    metrics = {
        **{f"val_{k}": v for k, v in val.items()},
        "task": parts.task.name,
        "steps": state.step,
        "epochs": state.epoch,
        "samples": state.samples,
        "world_size": parts.env.world_size,
        "global_batch": parts.global_batch,
        "norm": str(parts.cfg.norm.name),
        "lr": parts.optimizer.param_groups[0]["lr"],
        "samples_per_s": state.samples / max(state.train_time_s, 1e-9),
        "wall_time_s": state.train_time_s,
        "train_loss_history": state.train_loss_history,
        "skipped_steps": state.skipped_steps,
        "best": state.best,
        "val_history": state.val_history,
        "bn_telemetry": state.bn_telemetry,
    }
    if train is not None:
        metrics |= {f"train_{k}": v for k, v in scalars(train).items()}
    return metrics


def finish(run: Run, val: dict, metrics: dict) -> None:
    """The end of a finished run: metrics.json on rank 0, the final metrics to W&B."""
    if run.parts.env.is_main:
        write_json(run.parts.run_dir / "metrics.json", metrics)
    run.logger.log({f"final/val_{k}": v for k, v in scalars(val).items()}, run.state.step)
