"""What train.py runs: set up, train with DDP, and at the right steps sync, evaluate, checkpoint.

Read top to bottom: :func:`run` validates and joins the process group; :func:`_train` builds the
run's parts (:mod:`.parts`), resumes if there is a checkpoint, and drives :func:`_fit`, the loop
over epochs and steps. Each step is :func:`_train_step`, which never waits for the device. After
each step and at each epoch's end, one decision, :func:`_due`, says what is due now (sync the
losses? evaluate? checkpoint? keep the best? stop?) and :func:`_do` does it, in that order.
:func:`_sync` reads the steps' losses (one all-reduce) and acts on NaN and stop requests.

What differs between tasks (loss, metrics) comes from :mod:`.tasks`; evaluation and eval-only
from :mod:`.evaluate`; metrics.json, log lines and W&B from :mod:`.report`; signals, checkpoint
files, the resume policy and progress in samples from :mod:`.lifecycle` and :mod:`.state`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

import syncbn

from . import data, optim, report
from .config import validate
from .errors import ConfigError, RunDirLocked
from .evaluate import eval_only, evaluate_run, evaluate_train_split
from .lifecycle import exit_codes, preemption
from .lifecycle.env import DistEnv, rank_from_env, setup, teardown
from .lifecycle.orphan import under_torchrun, watch_parent
from .lifecycle.preemption import StopRequest
from .lifecycle.run_lock import RunLock, job_id_from_env
from .parts import Parts, Run, autocast, build, to_device
from .report import RunResult
from .state import checkpoint, progress, resume_from, resume_policy
from .state.progress import RunState
from .steplog import StepLog, StepRecord
from .wandb_logger import WandbLogger

log = logging.getLogger(__name__)


def run(cfg) -> RunResult:
    """Train (or, with ``trainer.eval_only``, evaluate) as ``cfg`` says, on every rank.

    Raises :class:`~syncbn.training.errors.ConfigError` for a bad configuration (rank 0 first
    records it in ``run_dir/status.json``: a wrapper never reads an earlier run's state); other
    outcomes are exit codes.
    """
    try:
        return _run(cfg)
    except ConfigError as error:
        # Not over the status of another job that trains in this run directory now.
        if (
            rank_from_env() == 0
            and not RunLock(Path(cfg.run_dir), job_id_from_env()).held_by_another()
        ):
            exit_codes.write_config_error(cfg.run_dir, error)
        raise


def _run(cfg) -> RunResult:
    validate(cfg)
    if under_torchrun():
        watch_parent(cfg.dist.orphan_grace_s)  # exit when the torchrun agent dies
    env = setup(str(cfg.dist.backend), cfg.dist.timeout_s, cfg.dist.init_method)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.trainer.cudnn_benchmark)
    try:
        with _run_lock(Path(cfg.run_dir), env):
            if cfg.trainer.eval_only:
                return eval_only(cfg, env)
            return _train(cfg, env)
    finally:
        teardown(env)


@contextlib.contextmanager
def _run_lock(run_dir: Path, env: DistEnv):
    """Hold the run directory's lock (:mod:`.lifecycle.run_lock`) while the run lasts.

    Rank 0 takes it; every rank learns the outcome (one broadcast) and, when another job holds
    it, raises :class:`~syncbn.training.errors.RunDirLocked` before writing anything.
    """
    lock, refusal = None, None
    if env.is_main:
        lock = RunLock(run_dir, job_id_from_env())
        try:
            lock.acquire()
        except RunDirLocked as error:
            lock, refusal = None, str(error)
    if env.world_size > 1:
        outcome = [refusal]
        dist.broadcast_object_list(outcome, src=0)
        refusal = outcome[0]
    if refusal is not None:
        raise RunDirLocked(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, env: DistEnv) -> RunResult:
    parts = build(cfg, env)
    state = RunState(reference_global_batch=parts.global_batch)
    found = resume_from.choose(cfg.trainer.resume, parts.run_dir, cfg.trainer.overwrite,
                               map_location=env.device, writer=env.is_main)  # fmt: skip
    if found is not None:
        state = _resume(parts, found.path, found.saved)
    total = progress.total_samples(cfg.trainer, state, len(parts.splits.train), parts.global_batch)
    if env.is_main:
        (parts.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(parts.config))
        exit_codes.write_status(parts.run_dir, None, step=state.step, samples=state.samples)
    logger = WandbLogger(cfg.logger, parts.run_dir, parts.config, enabled=env.is_main)
    r = Run(parts, state, StepLog(cfg.trainer.sync_every, env.device), logger, total)
    code, metrics = exit_codes.CRASHED, {}
    try:
        with preemption.stop_request() as stop:
            code, val = _fit(r, stop)
        if code == exit_codes.OK:
            metrics = _finish(r, val)
    finally:
        logger.finish(code, preempted=code == exit_codes.PREEMPTED)
        if env.is_main:
            extra = {} if r.nonfinite_step is None else {"nonfinite_step": r.nonfinite_step}
            last = parts.ckpts.last
            exit_codes.write_status(
                parts.run_dir, code, step=r.state.step, samples=r.state.samples,
                epoch=r.state.epoch, checkpoint=str(last) if last.is_file() else None, **extra,
            )  # fmt: skip
    return RunResult(code, metrics, metrics.get(f"val_{parts.task.primary}"))


def _resume(parts: Parts, path: Path, saved: dict[str, Any]) -> RunState:
    """Load the checkpoint ``saved`` (read from ``path``) into ``parts`` under the resume policy
    (:mod:`.state.resume_policy`); the progress it holds."""
    cfg, env = parts.cfg, parts.env
    resume_policy.check(path, saved.get("config"), parts.config)
    if env.is_main:
        resume_policy.warn_if_batch_changed(
            saved, env.world_size, cfg.trainer.batch_size, str(cfg.norm.name), cfg.norm.group_size
        )
    checkpoint.check_fits(path, parts.model, saved["model"])
    parts.model.load_state_dict(saved["model"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    optim.apply_hparams(parts.optimizer, cfg.optim)  # the config's values, not the checkpoint's
    state = RunState.from_checkpoint(saved, parts.global_batch)
    log.info("resumed from %s at epoch %d, step %d, sample %d", path, state.epoch, state.step,
             state.samples)  # fmt: skip
    return state


# ----------------------------------------------------------------------------------- the loop


def _fit(r: Run, stop: StopRequest) -> tuple[int, dict]:
    """The training loop; returns an exit code and the last validation metrics."""
    trainer, state, global_batch = r.parts.cfg.trainer, r.state, r.parts.global_batch
    val: dict = {}
    bar = tqdm(
        total=r.total_samples // global_batch,
        initial=state.samples // global_batch,
        disable=not (r.parts.env.is_main and trainer.progress),
        desc="train",
        dynamic_ncols=True,
        leave=False,
    )
    if _stop_agreed(r, stop):  # a signal during start-up: nothing new to save
        report.preempted_at_start(r)
        return exit_codes.PREEMPTED, val
    while not progress.finished(trainer, state):
        started = time.perf_counter()
        code, val, epoch_done = _epoch(r, stop, bar, val)
        state.train_time_s += time.perf_counter() - started
        if code is not None:
            return code, val
        if epoch_done:  # else max_steps was reached mid-epoch
            state.epoch, state.epoch_offset = state.epoch + 1, 0
        code, val = _do(r, _due(r, epoch_done=epoch_done), stop, val)
        if code is not None:
            return code, val
    bar.close()
    return exit_codes.OK, val


def _epoch(r: Run, stop: StopRequest, bar, val: dict) -> tuple[int | None, dict, bool]:
    """Train the rest of this epoch (or up to the run's last step); returns an exit code to stop
    with or None, the last validation metrics, and whether the epoch was completed."""
    parts, state = r.parts, r.state
    parts.train_loader.sampler.set_epoch(state.epoch, state.epoch_offset)
    parts.net.train()
    for x, y in parts.train_loader:
        _step(r, x, y)
        bar.update(1)
        due = _due(r)
        code, val = _do(r, due, stop, val)
        if code is not None:
            return code, val, False
        if due.stop:
            break
    left = data.steps_in_epoch(len(parts.splits.train), parts.global_batch, state.epoch_offset)
    return None, val, left == 0


def _step(r: Run, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step and its bookkeeping: learning rate, progress, the loss on the device."""
    parts, state = r.parts, r.state
    if _observes(r, state.step + 1):
        parts.telemetry.arm()
    lr = optim.lr_at(
        parts.cfg.optim,
        state.samples / state.reference_global_batch,
        r.total_samples / state.reference_global_batch,
    )
    optim.set_lr(parts.optimizer, lr)
    loss_sum, count, skipped = _train_step(parts, x, y)
    state.step += 1
    state.samples += parts.global_batch
    state.epoch_offset += parts.global_batch
    r.steps.record(state.step, lr, loss_sum, count, skipped)


@dataclass(frozen=True)
class Due:
    """What is due now, after a step or at an epoch's end; done in this order by :func:`_do`."""

    epoch_end: bool  # at an epoch's end (or the run's last step): evaluations log the epoch line
    stop: bool  # the run's last step was taken
    sync: bool  # read the pending steps' losses (every rank: a collective)
    observe: bool  # collect BN telemetry (a collective)
    evaluate: bool
    checkpoint: bool
    keep_best: bool  # after an evaluation: point best.pt at it if it is the best


def _due(r: Run, *, epoch_done: bool | None = None) -> Due:
    """The one decision of what to do now: after a step (``epoch_done`` None) or at an epoch's
    end (``epoch_done``: whether the epoch was completed, else max_steps stopped it).

    After a step: evaluate and checkpoint every ``trainer.eval_every_steps`` /
    ``trainer.ckpt_every_steps`` steps, but not at the run's last step, which is its epoch's end.
    At an epoch's end: every ``trainer.eval_every`` / ``trainer.ckpt_every`` completed epochs,
    and always at the run's end. Losses are synced every ``trainer.sync_every`` steps and before
    anything that needs them.
    """
    trainer, state = r.parts.cfg.trainer, r.state
    last = progress.finished(trainer, state)
    if epoch_done is None:
        evaluate = not last and _every(trainer.eval_every_steps, state.step)
        ckpt = not last and _every(trainer.ckpt_every_steps, state.step)
        observe = _observes(r, state.step)
    else:
        evaluate = last or (epoch_done and state.epoch % trainer.eval_every == 0)
        ckpt = last or (epoch_done and state.epoch % trainer.ckpt_every == 0)
        observe = False
    needs_losses = last or evaluate or ckpt or observe or r.steps.full
    return Due(
        epoch_end=epoch_done is not None,
        stop=last,
        sync=needs_losses and bool(r.steps.pending),
        observe=observe,
        evaluate=evaluate,
        checkpoint=ckpt,
        keep_best=evaluate,
    )


def _every(interval: int | None, step: int) -> bool:
    return bool(interval) and step % interval == 0


def _observes(r: Run, step: int) -> bool:
    """Whether BN telemetry is collected at ``step`` (armed before it, collected after it)."""
    return r.parts.telemetry is not None and _every(r.parts.cfg.trainer.bn_telemetry_every, step)


def _do(r: Run, due: Due, stop: StopRequest, val: dict) -> tuple[int | None, dict]:
    """Do what ``due`` says; returns an exit code to stop with (or None) and the last
    validation metrics."""
    if due.sync:
        code = _sync(r, stop)  # the only place a training step is read on the host
        if code is not None:
            return code, val
    if due.observe:
        report.telemetry(r)
    if due.evaluate:
        val = evaluate_run(r)
        if due.epoch_end:
            report.epoch_line(r, val)
    if due.checkpoint and not _checkpoint(r):
        return exit_codes.NONFINITE, val
    if due.keep_best:
        _keep_best(r, val)
    if due.evaluate and not due.epoch_end:
        r.parts.net.train()  # back to training mid-epoch (an epoch starts in training mode)
    return None, val


# ------------------------------------------------------------------------------ one step


def _train_step(parts: Parts, x: torch.Tensor, y: torch.Tensor):
    """One optimizer step on this rank's batch; nothing here waits for the device.

    The batch is split into ``trainer.accumulate`` micro-batches, each forward and backward on
    its own (DDP all-reduces the gradients after the last one only), so BN and SyncBN normalize
    over a micro-batch: ``batch_size / accumulate`` samples per rank, times the ranks for SyncBN.
    Returns the step's loss sum and count and (``trainer.nonfinite=skip``: a step with
    non-finite gradients changes nothing, see ``SkipGuard``) whether it was skipped, as device
    values for :class:`StepLog`.
    """
    cfg, env = parts.cfg, parts.env
    x, y = to_device(cfg, env, x), y.to(env.device, non_blocking=True)
    if parts.guard is not None:
        parts.guard.begin()
    parts.optimizer.zero_grad(set_to_none=True)
    k = cfg.trainer.accumulate
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=env.device), 0
    for i, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
        sync_grads = i == k - 1 or parts.ddp is None
        with contextlib.nullcontext() if sync_grads else parts.ddp.no_sync():
            with autocast(cfg, env):
                loss, n = parts.task.loss(parts.net(xs), ys)
            (loss / k).backward()
        loss_sum = loss_sum + loss.detach().double() * n
        count = count + n
    norm = None
    if cfg.trainer.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.trainer.grad_clip)
    skipped = None
    if parts.guard is not None:
        skipped = parts.guard.step(parts.optimizer, norm)
    else:
        parts.optimizer.step()
    return loss_sum, count, skipped


# ------------------------------------------------------------------- what is due, done


def _sync(r: Run, stop: StopRequest) -> int | None:
    """Read the steps since the last sync (one all-reduce, one host read) and act on them.

    Records each step's global loss, logs it every ``trainer.log_every`` steps, stops on
    non-finite steps as ``trainer.nonfinite`` says and on non-finite parameters (an update of
    finite gradients that overflowed, which ``skip`` cannot undo), and, when any rank was asked
    to stop (SIGTERM/SIGUSR1: the flag rides in the same all-reduce), checkpoints and preempts.
    Returns the exit code to stop with, or None to go on. Every rank calls it at the same steps.
    First raises the error of a SyncBN check that failed on the device since the last sync
    (:func:`syncbn.raise_device_errors`: the layer's name, as on CPU).
    """
    # A SyncBN check that failed on the device (Triton kernels: ranks at different layers) left
    # NaN outputs and a flag: raise its error naming the layer, before that NaN reads as a
    # non-finite step. Every rank of the layer's group saw the same failure, so all raise.
    syncbn.raise_device_errors(r.parts.env.device)
    parameters = r.parts.model.parameters()
    records, stop_all = r.steps.read(r.parts.env.world_size, stop.requested, parameters)
    for record in records:
        report.train_step(r, record)
        if not record.model_finite:  # an update with finite gradients overflowed the weights
            r.nonfinite_step = records[0].step
            report.nonfinite_parameters(r, records)
            return exit_codes.NONFINITE
        if record.finite:
            r.skips_in_a_row = 0
            continue
        r.skips_in_a_row += 1
        if not _nonfinite_step_skipped(r, record):
            return exit_codes.NONFINITE
    if stop_all:
        return _preempt(r)
    return None


def _stop_agreed(r: Run, stop: StopRequest) -> bool:
    """Whether any rank was asked to stop (one all-reduce; before the first step only, where
    no steps' losses are pending to carry the flag)."""
    flag = torch.tensor([float(stop.requested)], device=r.parts.env.device)
    if r.parts.env.world_size > 1:
        dist.all_reduce(flag)
    return bool(flag.item())


def _nonfinite_step_skipped(r: Run, record: StepRecord) -> bool:
    """A non-finite step: False to stop the run, True when it was skipped and the run goes on."""
    trainer = r.parts.cfg.trainer
    if trainer.nonfinite == "stop" or r.skips_in_a_row > trainer.max_consecutive_skips:
        r.nonfinite_step = record.step - r.skips_in_a_row + 1
        report.nonfinite_stop(r, record)
        return False
    if record.skipped:
        r.state.skipped_steps.append(record.step)
    report.nonfinite_skipped(record)
    return True


def _checkpoint(r: Run) -> bool:
    """Save the training state (rank 0 writes) unless any rank's model holds NaN/Inf.

    Returns False, writing nothing, when the model is not finite: a NaN checkpoint never
    replaces a good one. The all-reduce of that verdict is also the barrier that keeps every
    rank behind a checkpoint it might be resumed from.
    """
    parts = r.parts
    tensors = [t for t in parts.model.state_dict().values() if t.is_floating_point()]
    bad = torch.stack([~t.isfinite().all() for t in tensors]).any().float().reshape(1)
    if parts.env.world_size > 1:
        dist.all_reduce(bad)
    if bad.item():
        report.nonfinite_model(r)
        return False
    parts.ckpts.save(_training_state(r))
    if parts.env.world_size > 1:
        dist.barrier()
    return True


def _training_state(r: Run) -> dict[str, Any]:
    parts = r.parts
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "config": parts.config,
        "world_size": parts.env.world_size,
        **r.state.to_dict(),
    }


def _keep_best(r: Run, val: dict[str, float]) -> None:
    """After an evaluation: if it is the best so far, record it and point best.pt at it."""
    ckpts, state = r.parts.ckpts, r.state
    if not ckpts.improved(val, state.best):
        return
    metric = ckpts.best_metric
    state.best = {"metric": metric, "value": val[metric], "step": state.step}
    ckpts.save_best(lambda: _training_state(r), state.step)


def _preempt(r: Run) -> int:
    """All ranks stop here: checkpoint this step, then exit 75 (the caller flushes W&B)."""
    saved = _checkpoint(r)
    report.preempted(r, saved)
    return exit_codes.PREEMPTED if saved else exit_codes.NONFINITE


def _finish(r: Run, val: dict) -> dict:
    """After the last step: final metrics on every rank, metrics.json on rank 0."""
    if not val:  # resumed after the last step: evaluate what was trained
        val = evaluate_run(r)
    train = evaluate_train_split(r) if r.parts.cfg.trainer.eval_train else None
    metrics = report.final_metrics(r, val, train)
    report.finish(r, val, metrics)
    return metrics
