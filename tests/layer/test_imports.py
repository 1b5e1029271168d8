"""The layer's modules import one way: batchnorm <- norm_act <- convert.

``syncbn/batchnorm.py`` imports neither ``syncbn.convert`` nor ``syncbn.norm_act``, and
``syncbn/norm_act.py`` does not import ``syncbn.convert``: not at module level and not lazily
inside a function (both are read from the sources with ``ast``). ``convert`` attaches
``SyncBatchNorm.convert_sync_batchnorm`` to the class instead; whatever order the three modules
are imported in, a fresh interpreter finds that classmethod and it converts as
``syncbn.convert_sync_batchnorm`` does.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import syncbn

PACKAGE = Path(syncbn.__file__).parent
MODULES = ["syncbn.batchnorm", "syncbn.norm_act", "syncbn.convert"]

# module -> what it must not import ("syncbn" itself: the package imports every module)
FORBIDDEN = {
    "batchnorm": {"syncbn", "syncbn.convert", "syncbn.norm_act"},
    "norm_act": {"syncbn", "syncbn.convert"},
}


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` anywhere in ``path`` names, absolute.

    ``from . import name`` counts as importing ``syncbn.name`` when that is a submodule, else as
    importing the package ``syncbn``.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative to the syncbn package (modules at its top level)
                base = ".".join(["syncbn", *filter(None, [node.module])])
            else:
                base = node.module or ""
            if base != "syncbn":
                found.add(base)
                continue
            for alias in node.names:
                submodule = PACKAGE / f"{alias.name}.py"
                subpackage = PACKAGE / alias.name / "__init__.py"
                is_module = submodule.exists() or subpackage.exists()
                found.add(f"syncbn.{alias.name}" if is_module else "syncbn")
    return found


@pytest.mark.parametrize("name", FORBIDDEN)
def test_module_does_not_import_those_above_it(name):
    imported = _imported_modules(PACKAGE / f"{name}.py")
    assert not imported & FORBIDDEN[name], (
        f"syncbn/{name}.py expected to import none of {sorted(FORBIDDEN[name])} "
        f"(got {sorted(imported & FORBIDDEN[name])}); the arrows point batchnorm <- norm_act <- "
        f"convert: move what it needs down, or attach it from the module above"
    )


def test_the_import_reader_sees_lazy_and_package_imports(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        "from . import distributed as d\n"
        "from syncbn import SyncBatchNorm\n"
        "def f():\n"
        "    from .convert import convert_sync_batchnorm\n"
        "    import syncbn.norm_act\n"
    )
    assert _imported_modules(source) == {
        "syncbn.distributed",
        "syncbn",
        "syncbn.convert",
        "syncbn.norm_act",
    }


_CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
import torch
from torch import nn
from syncbn.batchnorm import SyncBatchNorm
from syncbn.convert import convert_sync_batchnorm
from syncbn.norm_act import SyncBatchNormAct

for cls in (SyncBatchNorm, SyncBatchNormAct):
    model = cls.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    assert type(model[1]) is SyncBatchNorm, type(model[1])
    assert model[1].layer_name == "1", model[1].layer_name  # named by convert_sync_batchnorm

class OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2

for convert in (SyncBatchNorm.convert_sync_batchnorm, convert_sync_batchnorm):
    try:
        convert(OwnForward(3))
    except TypeError as error:
        assert "OwnForward" in str(error), error
    else:
        raise AssertionError("a layer with its own forward was converted")
    assert type(convert(OwnForward(3), None, strict=False)) is OwnForward
print("ok")
"""


@pytest.mark.parametrize("order", list(itertools.permutations(MODULES)), ids="-".join)
def test_modules_import_in_any_order_and_keep_the_classmethod(order):
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _CHECK, *order],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
