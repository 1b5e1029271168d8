"""Every ``python`` snippet in docs/integrations/*.md runs, wherever its packages import.

A page's snippets run in order in one namespace; pages whose snippets need a process group run on
2 gloo ranks (``RANKED``). The torchvision/timm page runs in tests/gpu/test_vision.py, on the
machine where those packages import.
"""

from __future__ import annotations

import pytest

from tests.support.snippets import GPU_MACHINE_PAGES, PAGES, run, skip_unless_importable, snippets

RANKED = {"fsdp2.md"}


def test_every_page_has_a_snippet():
    assert {"lightning.md", "vision.md", "detectron2.md", "mmengine.md", "fsdp2.md"} <= set(PAGES)
    assert all(snippets(page) for page in PAGES)


@pytest.mark.parametrize("page", [page for page in PAGES if page not in GPU_MACHINE_PAGES])
def test_snippets_run(run_ranks, page):
    code = snippets(page)
    skip_unless_importable(code)
    if page in RANKED:
        run_ranks(run, 2, code)
    else:
        run(code)
