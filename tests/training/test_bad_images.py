"""Bad files in an image folder: a corrupt or truncated image names itself (data.bad_images=error)
or is skipped, counted and logged (skip); an empty class folder is refused before any training."""

from __future__ import annotations

import logging

import pytest

from syncbn.training import ConfigError, data
from tests.support.config import compose_config
from tests.support.images import write_image_folder


def _folder_with_bad_images(tmp_path):
    root = write_image_folder(tmp_path / "images")
    corrupt = root / "train" / "cat" / "0.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)  # a PNG header, then nonsense
    truncated = root / "train" / "dog" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:300])  # cut short mid-stream
    return root, corrupt, truncated


def _load(root, *overrides: str):
    cfg = compose_config("data=imagefolder", f"data.root={root}", "data.image_size=16", *overrides)
    return data.load(cfg.data, seed=0)


def test_a_bad_image_names_its_file(tmp_path):
    root, corrupt, truncated = _folder_with_bad_images(tmp_path)
    splits = _load(root)
    files = splits.train.source.files
    for path in (corrupt, truncated):
        with pytest.raises(RuntimeError) as caught:
            splits.train[(files.index(path), 0)]
        assert str(path) in str(caught.value) and "data.bad_images=skip" in str(caught.value)


def test_skip_replaces_a_bad_image_and_counts_it(tmp_path, caplog):
    root, corrupt, truncated = _folder_with_bad_images(tmp_path)
    splits = _load(root, "data.bad_images=skip")
    files = splits.train.source.files
    with caplog.at_level(logging.WARNING):
        for path in (corrupt, truncated):
            x, y = splits.train[(files.index(path), 0)]
            assert x.shape == (3, 16, 16)
    assert splits.train.source.skipped == 2
    assert [str(corrupt) in m for m in caplog.messages].count(True) == 1, caplog.messages
    assert "bad image 2 skipped" in caplog.messages[-1] and str(truncated) in caplog.messages[-1]


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    root = write_image_folder(tmp_path / "images")
    (root / "train" / "fox").mkdir()
    with pytest.raises(ConfigError) as caught:
        data.load(compose_config("data=imagefolder", f"data.root={root}").data)
    assert str(root / "train" / "fox") in str(caught.value)
