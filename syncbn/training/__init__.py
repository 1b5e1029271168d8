"""The training half of syncbn: what ``train.py`` runs (``syncbn.training.run(cfg)``)."""

from .loop import RunResult, evaluate, run

__all__ = ["RunResult", "evaluate", "run"]
