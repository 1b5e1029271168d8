"""What a resumed run may change, and what it may not.

A checkpoint carries the config it was trained with. On resume the current config is compared
key by key with it:

- **refused** (the run would no longer be the same run): ``model.*``, ``norm.name``, ``data.*``
  except ``data.root``, ``optim.name``, ``seed``, ``task.name``, ``task.ignore_index``.
  Resuming with any of them changed is a :class:`~syncbn.training.errors.ConfigError`
  naming each key with both values.
- **the global batch** (world size, ``trainer.batch_size``, ``norm.group_size``): allowed, with
  a warning that says what SyncBN now normalizes over. Progress is counted in samples
  (:mod:`syncbn.training.state.progress`), so the run still trains the amount asked for.
- **everything else takes effect** from the resumed step: ``optim.lr`` and the other optimizer
  hyperparameters and schedule keys, ``trainer.epochs``/``max_steps``, intervals, clipping,
  ``trainer.nonfinite``, logging, ``dist.*``... One log line lists what changed.

With ``trainer.eval_only`` only ``model.*`` is refused (and a change between ``norm=none`` and a
normalized model, whose parameters differ): a checkpoint may be evaluated on other data, and
BatchNorm and SyncBatchNorm checkpoints load into each other.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

REFUSED = ("model", "norm.name", "data", "optim.name", "seed", "task.name", "task.ignore_index")
ALLOWED_IN_REFUSED = ("data.root",)
IGNORED = ("run_dir", "trainer.resume", "trainer.eval_only")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys present in both configs whose values differ: ``{key: (saved, current)}``."""
    old, new = flatten(saved), flatten(current)
    return {
        k: (old[k], new[k])
        for k in sorted(old.keys() & new.keys())
        if old[k] != new[k] and not _under(k, IGNORED)
    }


def refused(diff: dict[str, tuple[Any, Any]], eval_only: bool) -> list[str]:
    if eval_only:
        norm = diff.get("norm.name")
        to_or_from_none = norm is not None and "none" in norm
        return [k for k in diff if _under(k, ("model",)) or (k == "norm.name" and to_or_from_none)]
    return [k for k in diff if _under(k, REFUSED) and not _under(k, ALLOWED_IN_REFUSED)]


def check(
    path, saved_config: dict[str, Any] | None, config: dict[str, Any], eval_only: bool = False
) -> dict[str, tuple[Any, Any]]:
    """Raise :class:`ConfigError` for a refused change; return the allowed ones (and log them)."""
    if saved_config is None:
        log.warning("checkpoint %s holds no config: resuming without comparing configs", path)
        return {}
    diff = changes(saved_config, config)
    bad = refused(diff, eval_only)
    if bad:
        listed = "; ".join(f"{k}: checkpoint {diff[k][0]!r}, now {diff[k][1]!r}" for k in bad)
        raise ConfigError(
            f"trainer.resume={path} expected the configuration the checkpoint was trained with "
            f"for {', '.join(bad)} (got {listed}). These keys define the run and cannot change "
            f"on resume; set them back, or start a new run (another hydra.run.dir, or "
            f"trainer.resume=null)"
        )
    allowed = {k: v for k, v in diff.items() if k not in bad}
    if allowed:
        log.info(
            "resume: changed %s (in effect from here on)",
            ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in allowed.items()),
        )
    return allowed


def warn_if_batch_changed(saved: dict[str, Any], world_size: int, batch_size: int, norm: str,
                          group_size: int | None) -> str | None:  # fmt: skip
    """A warning (logged, and returned) when the global batch or the batch SyncBN normalizes
    over (``norm.group_size`` ranks, all when null, x ``trainer.batch_size``) changed."""
    old_world = saved.get("world_size")
    old_config = saved.get("config") or {}
    old_batch = (old_config.get("trainer") or {}).get("batch_size")
    old_group = (old_config.get("norm") or {}).get("group_size")
    if old_world is None or old_batch is None:
        return None
    said = []
    global_changed = (old_world, old_batch) != (world_size, batch_size)
    if global_changed:
        said.append(
            f"the global batch changed from {old_world * old_batch} ({old_world} ranks x "
            f"{old_batch}) to {world_size * batch_size} ({world_size} ranks x {batch_size})"
        )
    old_sync = (old_group or old_world) * old_batch  # a sync group's ranks x batch_size
    new_sync = (group_size or world_size) * batch_size
    if norm == "syncbn" and old_sync != new_sync:
        why = ""
        if old_group != group_size:
            why = f" (norm.group_size {_yaml(old_group)} -> {_yaml(group_size)})"
        said.append(
            f"SyncBatchNorm now normalizes over {new_sync} samples per layer instead of "
            f"{old_sync}{why}"
        )
    elif norm == "bn" and global_changed:
        said.append(f"BatchNorm normalizes over each rank's {batch_size} samples")
    if not said:
        return None
    message = "resume: " + "; ".join(said)
    if global_changed:
        message += (
            ". Progress is counted in samples: the run trains the epochs (or max_steps x the "
            "first launch's global batch in samples) it was asked for"
        )
    log.warning(message)
    return message


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)
