"""The ``python`` snippets of docs/integrations/*.md, for the tests that run them."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "integrations"
PAGES = sorted(path.name for path in DOCS.glob("*.md"))
OPTIONAL = ("lightning", "mmengine", "torchvision", "timm", "onnx", "onnxscript")
# Pages whose packages import only on the GPU machine (CUDA wheels of torchvision and timm): their
# snippets run in tests/gpu, the others in tests/integrations.
GPU_MACHINE_PAGES = ("vision.md",)


def snippets(page: str) -> str:
    """A page's python snippets, in order, as one program."""
    text = (DOCS / page).read_text()
    return "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL))


def skip_unless_importable(code: str) -> None:
    imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, flags=re.MULTILINE))
    for name in sorted(imported & set(OPTIONAL)):
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - torchvision next to CPU torch: not ImportError
            pytest.skip(f"{name} does not import here ({type(error).__name__}: {error})")


def run(code: str) -> None:
    exec(compile(code, "<docs snippet>", "exec"), {"__name__": "docs_snippet"})
