"""Weights & Biases on rank 0 only; offline by default; a W&B outage never stalls or stops training.

``logger.mode=online`` meets an unreachable server in two ways, both bounded by
``logger.init_timeout_s`` (together):

1. a probe: one HTTP request to the server (W&B's ``base_url``) with that timeout as one
   wall-clock deadline (a server that trickles its answer a byte at a time cannot stretch it). No
   answer
   (a closed port, a firewall that drops packets, a server that accepts and never replies)
   means no online attempt at all.
2. ``wandb.init(settings=wandb.Settings(init_timeout=...))`` for a server that answers the probe
   but not W&B's API; the failed run is then torn down (``wandb.teardown``) so that the offline
   run can take its id.

W&B also reports its own errors (a failed start included) to the same server when the process
exits; during an outage that held the exit ~20 s (wandb 0.31, measured), so online mode sets
``WANDB_ERROR_REPORTING=false`` unless the environment already sets it.

Either way the run logs offline into ``run_dir/wandb`` instead (``wandb sync`` uploads it later)
with one warning, and training goes on. The other ranks wait for rank 0 meanwhile, which is why
the config checks require ``logger.init_timeout_s < dist.timeout_s``. Any later W&B error turns
logging off with a warning.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class WandbLogger:
    """Thin wrapper: ``log`` and ``finish`` become no-ops after any W&B error (with a warning)."""

    def __init__(self, cfg, run_dir: Path, config: dict[str, Any], enabled: bool):
        self.run = None
        self.mode = "disabled"
        if not enabled or cfg.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError as error:  # pragma: no cover - wandb is a dependency
            log.warning("W&B disabled: cannot import wandb (%s)", error)
            return
        mode = str(cfg.mode)
        budget = float(cfg.init_timeout_s)  # for the probe and wandb.init together
        if mode == "online":
            # W&B reports its own errors (a failed start included) to the same server when the
            # process exits; during an outage that held the exit ~20 s (wandb 0.31, measured).
            # WANDB_ERROR_REPORTING=true in the environment keeps the reports.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
            url = wandb.setup().settings.base_url
            started = time.monotonic()
            problem = probe(url, budget)
            budget = max(1.0, budget - (time.monotonic() - started))
            if problem:
                log.warning(
                    "W&B server %s unreachable (%s): logging offline to %s/wandb instead "
                    "(upload later with `wandb sync`)",
                    url,
                    problem,
                    run_dir,
                )
                mode = "offline"
        try:
            self.run = _init(wandb, cfg, mode, run_dir, config, budget)
        except Exception as error:  # noqa: BLE001 - logging must not take training down
            if mode != "online":
                log.warning("W&B disabled: wandb.init failed (%s)", error)
                return
            log.warning(
                "W&B online start failed within logger.init_timeout_s=%s s (%s): logging "
                "offline to %s/wandb instead",
                cfg.init_timeout_s,
                str(error).splitlines()[0],
                run_dir,
            )
            mode = "offline"
            try:
                wandb.teardown()  # forget the failed online run ("run ID ... is in use")
                self.run = _init(wandb, cfg, mode, run_dir, config, budget)
            except Exception as error2:  # noqa: BLE001
                log.warning("W&B disabled: offline wandb.init failed too (%s)", error2)
                return
        self.mode = mode

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B disabled: log failed (%s)", error)
            self.run = None

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Flush and close the run; ``preempted`` marks it so (it resumes on the next launch)."""
        if self.run is None:
            return
        try:
            if preempted:
                self.run.mark_preempting()
            self.run.finish(exit_code=exit_code)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B finish failed (%s)", error)
        self.run = None


def probe(url: str, timeout_s: float) -> str | None:
    """None when the server at ``url`` answers an HTTP request within ``timeout_s``, else why not.

    Any HTTP answer counts (even 404): the point is that something is there and replies.
    ``timeout_s`` is one wall-clock deadline for the whole request: urllib's own timeout bounds
    each socket operation, so a server that trickles a byte at a time would hold it for ever.
    The request runs in a daemon thread that is abandoned (left to its socket timeout) when the
    deadline passes.
    """
    outcome: list[str | None] = []

    def request() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                response.read(1)
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except OSError as error:  # URLError, TimeoutError, ConnectionError...
            reason = getattr(error, "reason", error)
            timed_out = isinstance(reason, TimeoutError | socket.timeout)
            outcome.append(
                f"no answer within {timeout_s} s: {reason}" if timed_out else str(reason)
            )

    thread = threading.Thread(target=request, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"no answer within {timeout_s} s: the request is still incomplete"
    return outcome[0]


def _init(wandb, cfg, mode: str, run_dir: Path, config: dict[str, Any], timeout_s: float):
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        tags=list(cfg.tags or []),
        name=cfg.name,
        mode=mode,
        dir=str(run_dir),
        config=config,
        resume="allow",
        id=_run_id(run_dir),
        settings=wandb.Settings(init_timeout=timeout_s),
    )


def _run_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed run continues the same W&B run."""
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id
