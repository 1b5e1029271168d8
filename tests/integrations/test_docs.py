"""Every ``python`` snippet in docs/integrations/*.md runs, wherever its packages import.

A page's snippets run in order in one namespace; pages whose snippets need a process group run on
2 gloo ranks (``RANKED``). A page whose packages do not import here is skipped, naming them.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "integrations"
PAGES = sorted(path.name for path in DOCS.glob("*.md"))
RANKED = {"fsdp2.md"}
OPTIONAL = ("lightning", "mmengine", "torchvision", "timm", "onnx", "onnxscript")


def _snippets(page: str) -> str:
    text = (DOCS / page).read_text()
    return "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL))


def _skip_unless_importable(code: str) -> None:
    imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, flags=re.MULTILINE))
    for name in sorted(imported & set(OPTIONAL)):
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - torchvision next to CPU torch: not ImportError
            pytest.skip(f"{name} does not import here ({type(error).__name__}: {error})")


def _run(code: str) -> None:
    exec(compile(code, "<docs snippet>", "exec"), {"__name__": "docs_snippet"})


def test_every_page_has_a_snippet():
    assert {"lightning.md", "vision.md", "detectron2.md", "mmengine.md", "fsdp2.md"} <= set(PAGES)
    assert all(_snippets(page) for page in PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_snippets_run(run_ranks, page):
    code = _snippets(page)
    _skip_unless_importable(code)
    if page in RANKED:
        run_ranks(_run, 2, code)
    else:
        _run(code)
