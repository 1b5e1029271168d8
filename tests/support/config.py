"""The real conf/ composed as train.py composes it, for tests (no second copy of the config)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from syncbn.training.config import schema
from tests.support.launch import ROOT

schema.register()


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["run_dir=unused", *overrides])


def composition_error(*overrides: str) -> str:
    """Hydra's message (with its cause, as train.py prints it) for overrides it refuses."""
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(*overrides)
    return f"{caught.value} {caught.value.__cause__}"
