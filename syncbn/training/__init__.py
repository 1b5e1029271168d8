"""The training half of syncbn: what ``train.py`` runs (``syncbn.training.run(cfg)``)."""

from .errors import ConfigError
from .evaluate import evaluate
from .loop import run
from .report import RunResult

__all__ = ["ConfigError", "RunResult", "evaluate", "run"]
