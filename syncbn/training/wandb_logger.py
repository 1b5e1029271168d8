"""Weights & Biases on rank 0 only; offline by default; a W&B failure never stops training."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")


class WandbLogger:
    """Thin wrapper: ``log`` and ``finish`` become no-ops after any W&B error (with a warning)."""

    def __init__(self, cfg, run_dir: Path, config: dict[str, Any], enabled: bool):
        self.run = None
        if not enabled or cfg.mode == "disabled":
            return
        if cfg.mode not in MODES:
            raise ValueError(f"logger.mode expected one of {MODES} (got {cfg.mode!r})")
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                tags=list(cfg.tags or []),
                name=cfg.name,
                mode=cfg.mode,
                dir=str(run_dir),
                config=config,
                resume="allow",
                id=_run_id(run_dir),
            )
        except Exception as error:  # noqa: BLE001 - logging must not take training down
            log.warning("W&B disabled: wandb.init failed (%s)", error)
            self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B disabled: log failed (%s)", error)
            self.run = None

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B finish failed (%s)", error)
        self.run = None


def _run_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed run continues the same W&B run."""
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id
