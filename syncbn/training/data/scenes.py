"""Digit scenes: a segmentation dataset made of real images, small enough for CPU runs.

Each scene is a ``canvas x canvas`` image holding ``digits_per_image`` handwritten digits from
scikit-learn's 1797 8x8 digits, each upscaled by a random integer factor in ``digit_scale``
(bilinear) and placed at a random position without overlapping the others. Every pixel is
labelled: ``0`` background, ``1 + d`` a pixel of digit ``d`` (11 classes). Pixels on a digit's
faint rim (upscaled intensity between ``rim[0]`` and ``rim[1]`` of the 0-16 range) are labelled
``ignore_index``: which class they belong to is ambiguous, as on the object borders of Pascal
VOC, and no loss or metric counts them.

Training and validation scenes are drawn from *disjoint* sets of digit images (split by
``data.val_fraction`` with ``data.split_seed``), so validation measures generalization to new
handwriting. Scenes are generated once, deterministically from ``data.split_seed``, and held in
memory (``num_train + num_val`` scenes of ``canvas^2`` float32 + uint8).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Splits, TensorSource, identity, splits
from .memory import check_fits, load_digits, normalize, split_indices
from .transforms import ShiftFlip

BACKGROUND = 0
NUM_CLASSES = 11  # background + 10 digits
CLASS_NAMES = ["background", *(str(d) for d in range(10))]


def digit_scenes(cfg, seed: int | None, augment: bool) -> Splits:
    """The scenes of ``cfg`` (``conf/data/digit_scenes.yaml``) as :class:`Splits`."""
    scenes = cfg.num_train + cfg.num_val  # each a float32 input and a long mask per pixel
    check_fits("(data.num_train + data.num_val) x data.canvas^2", scenes * cfg.canvas**2, 4 + 8)
    images, labels = load_digits()  # (1797, 8, 8), values 0..16; (1797,)
    train_ids, val_ids = split_indices(len(images), cfg.val_fraction, cfg.split_seed)
    rng = np.random.default_rng(cfg.split_seed)
    x_train, y_train = render(images[train_ids], labels[train_ids], cfg.num_train, cfg, rng)
    x_val, y_val = render(images[val_ids], labels[val_ids], cfg.num_val, cfg, rng)
    x_train, x_val, (mean, std) = normalize(x_train, x_val)
    blank = float((0 - mean) / std)
    return splits(
        TensorSource(x_train, y_train), TensorSource(x_val, y_val),
        ShiftFlip(cfg.augment_shift, cfg.augment_flip, fill=blank, target_fill=BACKGROUND),
        identity, 1, NUM_CLASSES, seed, augment,
        ignore_index=cfg.ignore_index, class_names=CLASS_NAMES,
    )  # fmt: skip


def render(
    images: torch.Tensor, labels: torch.Tensor, count: int, cfg, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` scenes from these digit images: inputs ``(count, 1, S, S)``, masks
    ``(count, S, S)`` (long)."""
    size = cfg.canvas
    scales = range(cfg.digit_scale[0], cfg.digit_scale[1] + 1)
    # every digit image upscaled once per scale: (n, k*8, k*8)
    scaled = {k: F.interpolate(images[:, None], scale_factor=k, mode="bilinear",
                               align_corners=False)[:, 0] for k in scales}  # fmt: skip
    x = torch.zeros(count, 1, size, size)
    y = torch.full((count, size, size), BACKGROUND, dtype=torch.long)
    low, high = cfg.rim
    for i in range(count):
        boxes: list[tuple[int, int, int]] = []
        wanted = int(rng.integers(cfg.digits_per_image[0], cfg.digits_per_image[1] + 1))
        for _ in range(wanted * 20):  # rejection sampling of non-overlapping boxes
            if len(boxes) == wanted:
                break
            k = int(rng.choice(list(scales)))
            side = 8 * k
            if side > size:
                continue
            top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if any(_overlap((top, left, side), b) for b in boxes):
                continue
            boxes.append((top, left, side))
            which = int(rng.integers(len(images)))
            digit = scaled[k][which]
            x[i, 0, top : top + side, left : left + side] = digit
            patch = y[i, top : top + side, left : left + side]
            patch[digit >= high] = 1 + int(labels[which])
            patch[(digit >= low) & (digit < high)] = cfg.ignore_index
    return x, y


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ta, la, sa), (tb, lb, sb) = a, b
    return ta < tb + sb and tb < ta + sa and la < lb + sb and lb < la + sa
