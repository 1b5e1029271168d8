"""What train.py runs: set up, train with DDP, evaluate exactly, checkpoint, log, write metrics."""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..precise_bn import precise_bn
from ..telemetry import BNTelemetry
from . import checkpoint, data
from .config_checks import validate
from .env import DistEnv, setup, teardown
from .models import build_model
from .wandb_logger import WandbLogger

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    """Train as ``cfg`` says; returns (on every rank) the final metrics rank 0 writes."""
    validate(cfg)
    env = setup(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        return _train(cfg, env)
    finally:
        teardown(env)


def _train(cfg, env: DistEnv) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plain_config = OmegaConf.to_container(cfg, resolve=True)
    if env.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(plain_config))

    torch.manual_seed(cfg.seed)  # same model initialization on every rank
    splits = data.load(cfg.data)
    if env.world_size * cfg.trainer.batch_size > len(splits.train):
        raise ValueError(
            f"trainer.batch_size x world size = {cfg.trainer.batch_size} x {env.world_size} "
            f"expected at most the {len(splits.train)} training samples; use fewer ranks or a "
            f"smaller batch_size"
        )
    train_loader, val_loader = data.loaders(
        splits, cfg.trainer.batch_size, env.rank, env.world_size, cfg.seed
    )
    model = build_model(
        cfg.model,
        cfg.norm.name,
        splits.in_channels,
        splits.num_classes,
        cfg.norm.group_size,
        debug=cfg.norm.get("debug"),
        check_finite=cfg.norm.get("check_finite"),
    ).to(env.device)
    net = model
    if env.world_size > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.trainer.compile:
        net = torch.compile(net)

    precise = None  # re-estimates the BN statistics before each evaluation
    if cfg.trainer.get("precise_bn_batches"):
        precise_loader = data.eval_loader(
            splits.train, cfg.trainer.batch_size, env.rank, env.world_size
        )
        precise = partial(precise_bn, model, precise_loader, cfg.trainer.precise_bn_batches)

    telemetry = _telemetry(cfg, model)

    steps_per_epoch = len(train_loader)
    total_steps = cfg.trainer.max_steps or cfg.trainer.epochs * steps_per_epoch
    optimizer = _optimizer(cfg.optim, model)
    scheduler = _scheduler(optimizer, cfg.optim, total_steps)
    amp = bool(cfg.trainer.amp) and env.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    state = {
        "epoch": 0,
        "step": 0,
        "train_loss_history": [],
        "val_history": [],  # {"step", "loss", "acc"} at every evaluation
        "bn_telemetry": [],  # {"step", "bn/...": value} every trainer.bn_telemetry_every steps
        "train_time_s": 0.0,
    }
    resume_from = checkpoint.resolve(cfg.trainer.resume, run_dir)
    if resume_from is not None:
        saved = checkpoint.load(resume_from, map_location=env.device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = {k: saved.get(k, default) for k, default in state.items()}
        log.info("resumed from %s at epoch %d, step %d", resume_from, state["epoch"], state["step"])

    logger = WandbLogger(cfg.logger, run_dir, plain_config, enabled=env.is_main)
    exit_code = 1
    try:
        val = {}
        progress = tqdm(
            total=total_steps,
            initial=state["step"],
            disable=not (env.is_main and cfg.trainer.progress),
            desc="train",
            dynamic_ncols=True,
            leave=False,
        )
        while state["step"] < total_steps:
            epoch = state["epoch"]
            train_loader.sampler.set_epoch(epoch)
            # Augmentation randomness is a function of (seed, epoch, rank): a resumed run draws
            # exactly what an uninterrupted one would, with no RNG state to carry.
            torch.manual_seed(cfg.seed + 1000 * (epoch + 1) + env.rank)
            started = time.perf_counter()
            net.train()
            for x, y in train_loader:
                observe = telemetry and (state["step"] + 1) % cfg.trainer.bn_telemetry_every == 0
                if observe:
                    telemetry.arm()
                loss = _train_step(cfg, net, model, optimizer, scheduler, scaler, x, y, env, amp)
                state["train_loss_history"].append(loss)
                state["step"] += 1
                if observe:
                    _log_telemetry(telemetry, state, logger, env)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
                if state["step"] % cfg.trainer.log_every == 0:
                    logger.log(
                        {
                            "train/loss": loss,
                            "train/lr": scheduler.get_last_lr()[0],
                            "epoch": epoch,
                        },
                        step=state["step"],
                    )
                every = cfg.trainer.eval_every_steps
                if every and state["step"] % every == 0 and state["step"] < total_steps:
                    _validate(net, val_loader, env, state, logger, precise)
                    net.train()
                if state["step"] >= total_steps:
                    break
            state["train_time_s"] += time.perf_counter() - started
            state["epoch"] = epoch + 1
            last = state["step"] >= total_steps
            if last or state["epoch"] % cfg.trainer.eval_every == 0:
                val = _validate(net, val_loader, env, state, logger, precise)
                if env.is_main:
                    log.info(
                        "epoch %d step %d: train_loss %.4f val_loss %.4f val_acc %.4f%s",
                        epoch,
                        state["step"],
                        state["train_loss_history"][-1],
                        val["loss"],
                        val["acc"],
                        f" (with EMA statistics {val['acc_ema']:.4f})" if "acc_ema" in val else "",
                    )
            if last or state["epoch"] % cfg.trainer.ckpt_every == 0:
                _save(run_dir, model, optimizer, scheduler, scaler, state, plain_config, env)
        progress.close()
        if not val:  # resumed after the last step: evaluate what was trained
            val = evaluate(net, val_loader, env)
        metrics = _metrics(val, state, cfg, env)
        if cfg.trainer.eval_train:  # un-augmented, every training sample once
            train_eval = data.eval_loader(
                splits.train, cfg.trainer.batch_size, env.rank, env.world_size
            )
            train = evaluate(net, train_eval, env)
            metrics |= {"train_acc": train["acc"], "train_loss": train["loss"]}
        if env.is_main:
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.log({"final/val_acc": val["acc"], "final/val_loss": val["loss"]}, state["step"])
        exit_code = 0
        return metrics
    finally:
        logger.finish(exit_code)


def _train_step(cfg, net, model, optimizer, scheduler, scaler, x, y, env, amp) -> float:
    """One optimizer step; returns the *global*-batch mean loss (averaged over all ranks)."""
    x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
    if cfg.trainer.augment:
        x = data.augment(x, cfg.data.augment_shift, cfg.data.augment_flip)
    with torch.autocast(env.device.type, enabled=amp):
        loss = F.cross_entropy(net(x), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.trainer.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    summed = torch.stack(
        [loss.detach().float() * len(y), torch.tensor(float(len(y)), device=x.device)]
    )
    if env.world_size > 1:
        dist.all_reduce(summed)
    return (summed[0] / summed[1]).item()


def _telemetry(cfg, model) -> BNTelemetry | None:
    if not cfg.trainer.get("bn_telemetry_every"):
        return None
    telemetry = BNTelemetry(model)
    if not telemetry.layers:
        log.warning("trainer.bn_telemetry_every: no SyncBatchNorm layer to observe (norm=syncbn)")
        return None
    if cfg.trainer.compile:
        log.warning("trainer.bn_telemetry_every: layers inside torch.compile are not recorded")
    return telemetry


def _log_telemetry(telemetry: BNTelemetry, state: dict, logger, env: DistEnv) -> None:
    metrics = telemetry.collect()  # a collective: every rank, the same steps
    if not metrics:
        return
    state["bn_telemetry"].append({"step": state["step"], **metrics})
    logger.log(metrics, step=state["step"])
    if env.is_main:
        log.info("step %d: %s", state["step"], telemetry.summary(metrics))


def _validate(net, val_loader, env, state, logger, precise=None) -> dict[str, float]:
    """Evaluate, record the point in the run's validation history, log it.

    With ``precise`` (PreciseBN), evaluates twice: with the running averages as they are
    (``acc_ema``, ``loss_ema``), then with the statistics ``precise()`` sets (``acc``, ``loss``).
    """
    extra = {}
    if precise is not None:
        ema = evaluate(net, val_loader, env)
        extra = {"acc_ema": ema["acc"], "loss_ema": ema["loss"]}
        precise()
    val = evaluate(net, val_loader, env) | extra
    point = {"step": state["step"], "loss": val["loss"], "acc": val["acc"], **extra}
    state["val_history"].append(point)
    logger.log({f"val/{k}": v for k, v in val.items()} | {"epoch": state["epoch"]}, state["step"])
    return val


@torch.no_grad()
def evaluate(net, loader, env: DistEnv) -> dict[str, float]:
    """Loss and accuracy over the whole validation set: every sample counted exactly once."""
    net.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, count
    for x, y in loader:
        x, y = x.to(env.device), y.to(env.device)
        logits = net(x)
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    if env.world_size > 1:
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return {"loss": loss / count, "acc": correct / count, "count": int(count)}


def _optimizer(cfg, model) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # norm params, biases
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ValueError(f"optim.name expected one of ('sgd', 'adamw') (got {cfg.name!r})")


def _scheduler(optimizer, cfg, total_steps: int):
    """Linear warmup for ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x lr."""
    warmup = min(cfg.warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save(run_dir, model, optimizer, scheduler, scaler, state, plain_config, env) -> None:
    if env.is_main:
        checkpoint.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "config": plain_config,
                **state,
            },
            run_dir / "checkpoints",
        )
    if env.world_size > 1:
        dist.barrier()  # nobody races ahead of a checkpoint that might be resumed from


def _metrics(val, state, cfg, env) -> dict:
    samples = state["step"] * cfg.trainer.batch_size * env.world_size
    ema = {f"val_{k}": val[k] for k in ("acc_ema", "loss_ema") if k in val}
    return {
        "val_acc": val["acc"],
        "val_loss": val["loss"],
        **ema,
        "val_count": val["count"],
        "steps": state["step"],
        "epochs": state["epoch"],
        "world_size": env.world_size,
        "norm": cfg.norm.name,
        "samples_per_s": samples / max(state["train_time_s"], 1e-9),
        "wall_time_s": state["train_time_s"],
        "train_loss_history": state["train_loss_history"],
        "val_history": state["val_history"],
        "bn_telemetry": state["bn_telemetry"],
    }
