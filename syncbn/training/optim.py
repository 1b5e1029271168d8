"""The optimizer, its hyperparameters from the config, and the learning-rate schedule.

The schedule is a pure function of training progress in *samples*, recomputed every step from
the config, so there is no scheduler state to restore and a resumed run with a new ``optim.lr``
(or ``trainer.epochs``, ``optim.warmup_steps``...) follows the new schedule from where it is.
Steps are counted in units of the run's reference global batch ``G_ref`` (the global batch of its
first launch): with ``t = samples / G_ref`` and ``T`` the planned total in the same units,

.. math::

    \\text{lr}(t) = \\text{lr} \\cdot \\begin{cases}
        (t + 1) / w & t < w \\quad\\text{(linear warmup, } w = \\min(\\text{warmup\\_steps}, T))\\\\
        r + (1 - r) \\tfrac12 \\bigl(1 + \\cos(\\pi \\tfrac{t - w}{\\max(1, T - w)})\\bigr)
            & \\text{cosine, } r = \\text{min\\_lr\\_ratio}
    \\end{cases}

which on an unchanged world size is the usual per-step warmup-cosine schedule.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def build(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW over two groups: weights with decay, norm parameters and biases without.

    The fused implementation (one kernel for all parameters, on CPU and CUDA) when torch has it
    for the parameters' device: it can also skip a step on the device (``found_inf``, see
    :mod:`syncbn.training.nonfinite`).
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay}, {"params": no_decay}]
    if cfg.name == "sgd":
        make = partial(torch.optim.SGD, momentum=cfg.momentum, nesterov=cfg.nesterov)
    elif cfg.name == "adamw":
        make = partial(torch.optim.AdamW, betas=tuple(cfg.betas))
    else:  # the schema's OptimName keeps this out
        raise ValueError(f"optim.name expected one of ('sgd', 'adamw') (got {cfg.name!r})")
    try:
        optimizer = make(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or torch
        optimizer = make(groups, lr=cfg.lr)
    apply_hparams(optimizer, cfg)
    return optimizer


def apply_hparams(optimizer: torch.optim.Optimizer, cfg) -> None:
    """Set the config's hyperparameters on ``optimizer``'s groups.

    ``load_state_dict`` restores the checkpoint's values; calling this after it makes the
    config's current values (a resume with a new ``optim.weight_decay``, ``optim.momentum``...)
    take effect. The learning rate is set every step by :func:`lr_at`.
    """
    decay, no_decay = optimizer.param_groups
    decay["weight_decay"], no_decay["weight_decay"] = float(cfg.weight_decay), 0.0
    for group in optimizer.param_groups:
        group["lr"] = float(cfg.lr)
        if cfg.name == "sgd":
            group["momentum"], group["nesterov"] = float(cfg.momentum), bool(cfg.nesterov)
        else:
            group["betas"] = tuple(float(b) for b in cfg.betas)


def lr_at(cfg, t: float, total: float) -> float:
    """The learning rate after ``t`` reference steps of a run planned for ``total`` of them."""
    warmup = min(cfg.warmup_steps, total)
    if t < warmup:
        return cfg.lr * (t + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (t - warmup) / max(1.0, total - warmup))
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
