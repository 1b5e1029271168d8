"""The experiment scripts as modules, for tests that call their functions (no ``sys.path`` edit:
each script is loaded from its file and registered under its name, so its neighbours' imports
find it)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.support.launch import ROOT

EXPERIMENTS = ROOT / "scripts" / "experiments"


def load_experiment(name: str, *neighbours: str) -> ModuleType:
    """``scripts/experiments/<name>.py``, after the neighbours it imports (e.g. ``mlplib``)."""
    for module in (*neighbours, name):
        path = EXPERIMENTS / f"{module}.py"
        if getattr(sys.modules.get(module), "__file__", None) == str(path):
            continue  # loaded already
        spec = importlib.util.spec_from_file_location(module, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[module] = loaded  # dataclasses and neighbours look modules up there
        spec.loader.exec_module(loaded)
    return sys.modules[name]
