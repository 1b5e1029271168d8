"""The training half of syncbn: what ``train.py`` runs (``syncbn.training.run(cfg)``)."""

from .loop import evaluate, run

__all__ = ["evaluate", "run"]
