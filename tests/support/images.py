"""Small image folders in ImageNet's layout, written for tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=4, size=(40, 30)):
    """PNG files in ImageNet's layout; each class a different colour, sizes vary."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = size[0] + 4 * i, size[1] + 2 * i
                pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
                pixels[..., c] += 150  # the class is the dominant channel
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
