"""Reject bad configuration before any work starts, naming the key and the valid choices."""

from __future__ import annotations

from ..distributed import divisors
from .data import DATASETS
from .env import world_size_from_env
from .models import NORMS
from .wandb_logger import MODES


def validate(cfg) -> None:
    world_size = world_size_from_env()
    checks = [
        (cfg.norm.name in NORMS, f"norm expected one of {NORMS} (got {cfg.norm.name!r})"),
        (cfg.data.name in DATASETS, f"data expected one of {DATASETS} (got {cfg.data.name!r})"),
        (
            cfg.logger.mode in MODES,
            f"logger.mode expected one of {MODES} (got {cfg.logger.mode!r})",
        ),
        (
            _positive(cfg.trainer.batch_size),
            f"trainer.batch_size expected > 0 (got {cfg.trainer.batch_size!r})",
        ),
        (
            _positive(cfg.trainer.epochs) or _positive(cfg.trainer.max_steps),
            f"trainer.epochs or trainer.max_steps expected > 0 "
            f"(got {cfg.trainer.epochs}, {cfg.trainer.max_steps})",
        ),
        (
            _positive(cfg.trainer.eval_every),
            f"trainer.eval_every expected > 0 (got {cfg.trainer.eval_every})",
        ),
        *(
            _positive_or_null(cfg.trainer, "trainer", key)
            for key in ("eval_every_steps", "precise_bn_batches", "bn_telemetry_every")
        ),
        (
            _positive(cfg.trainer.ckpt_every),
            f"trainer.ckpt_every expected > 0 (got {cfg.trainer.ckpt_every})",
        ),
        (cfg.optim.lr > 0, f"optim.lr expected > 0 (got {cfg.optim.lr})"),
    ]
    group_size = cfg.norm.group_size
    if group_size is not None:
        checks.append(
            (
                _positive(group_size) and world_size % group_size == 0,
                f"norm.group_size expected a divisor of the world size {world_size} "
                f"(got {group_size}); choose one of {divisors(world_size)} or null",
            )
        )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_or_null(section, prefix: str, key: str) -> tuple[bool, str]:
    """The check of an optional count: null (off) or a positive integer."""
    value = section.get(key)
    return value is None or _positive(value), f"{prefix}.{key} expected > 0 or null (got {value})"
