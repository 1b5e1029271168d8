"""The errors the training side raises on purpose: one module that imports nothing of ours, so
every other module (config checks, data, models, tasks, the resume policy) can raise them without
importing each other."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; train.py prints the message (no traceback) and exits 78."""


class RunDirLocked(RuntimeError):
    """Another job holds the run directory's lock; train.py prints the message and exits 73."""
