"""The training half of syncbn: what ``train.py`` runs (``syncbn.training.run(cfg)``)."""

from .errors import ConfigError
from .loop import RunResult, evaluate, run

__all__ = ["ConfigError", "RunResult", "evaluate", "run"]
