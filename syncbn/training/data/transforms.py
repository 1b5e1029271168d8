"""Per-sample transforms: ``transform((input, target), rng) -> (input tensor, target tensor)``.

``rng`` is a :class:`numpy.random.Generator` seeded for this sample of this epoch (training), or
None (evaluation, PreciseBN, the un-augmented training split): then the transform is
deterministic. A target that is an image (a segmentation mask, ``(H, W)``) moves with its input.
Pure PyTorch and Pillow, no torchvision: the package must not depend on it (its wheels for a
given torch are often CUDA builds).

- :class:`ShiftFlip`: in-memory tensors, the classic CIFAR augmentation: a random translation by
  up to ``max_shift`` pixels (pad, then crop back; "crop with padding") and a horizontal flip.
- :class:`ImageTransform`: Pillow images (image folders): random resized crop (Inception/ImageNet)
  or pad-and-crop, flip, to tensor, normalize; for evaluation, resize and center crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ShiftFlip:
    """Translate a ``(C, H, W)`` tensor by up to ``max_shift`` pixels and flip it with p=1/2.

    The uncovered border is ``fill`` (the normalized value of a blank pixel); a mask target is
    shifted and flipped with its input, its border filled with ``target_fill``.
    """

    def __init__(self, max_shift: int, flip: bool, fill: float = 0.0, target_fill: int = 0):
        self.max_shift, self.flip = max_shift, flip
        self.fill, self.target_fill = fill, target_fill

    def __call__(self, sample, rng: np.random.Generator | None):
        x, y = sample
        if rng is None:
            return x, y
        mask = y.ndim == 2
        if self.max_shift > 0:
            dx, dy = (int(v) for v in rng.integers(-self.max_shift, self.max_shift + 1, size=2))
            x = shift(x, dx, dy, self.fill)
            if mask:
                y = shift(y[None], dx, dy, self.target_fill)[0]
        if self.flip and rng.random() < 0.5:
            x = x.flip(-1)
            if mask:
                y = y.flip(-1)
        return x.contiguous(), y.contiguous() if mask else y


def shift(x: torch.Tensor, dx: int, dy: int, fill: float) -> torch.Tensor:
    """``x`` moved ``dx`` pixels right and ``dy`` down; the uncovered border is ``fill``."""
    if dx == 0 and dy == 0:
        return x
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    src_y, dst_y = _overlap(dy, h)
    src_x, dst_x = _overlap(dx, w)
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def _overlap(offset: int, size: int) -> tuple[slice, slice]:
    """Source and destination slices of a move by ``offset`` along an axis of ``size``."""
    if offset >= 0:
        return slice(0, max(0, size - offset)), slice(min(offset, size), size)
    return slice(min(-offset, size), size), slice(0, max(0, size + offset))


class ImageTransform:
    """Pillow image -> normalized float tensor ``(3, S, S)``, ``S = image_size``.

    Training (``rng`` given), ``augment``:

    - ``random_resized_crop``: a crop of a random area fraction in ``scale`` and aspect ratio in
      ``ratio`` (log-uniform), resized to ``S`` (10 tries, then the central crop of the largest
      allowed shape; the Inception/ImageNet recipe, as torchvision's RandomResizedCrop);
    - ``pad_crop``: resize to ``S``, pad by ``pad`` pixels, crop ``S`` at a random position
      (CIFAR's recipe);
    - ``none``: the evaluation transform.

    then a horizontal flip with p=1/2 when ``flip``. Evaluation: resize the shorter side to
    ``S / resize_ratio`` and crop the center ``S`` (``resize_ratio`` 0.875: 224 out of 256).
    """

    AUGMENTS = ("random_resized_crop", "pad_crop", "none")

    def __init__(
        self, image_size: int, mean: Sequence[float], std: Sequence[float], augment: str,
        flip: bool, scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3), pad: int = 4, resize_ratio: float = 0.875,
    ):  # fmt: skip
        if augment not in self.AUGMENTS:
            raise ValueError(f"augment expected one of {self.AUGMENTS} (got {augment!r})")
        self.size, self.augment, self.flip = image_size, augment, flip
        self.scale, self.ratio, self.pad, self.resize_ratio = scale, ratio, pad, resize_ratio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, sample, rng: np.random.Generator | None):
        image, label = sample
        if rng is None or self.augment == "none":
            image = self._center(image)
        elif self.augment == "random_resized_crop":
            box = random_resized_box(image.size, self.scale, self.ratio, rng)
            image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        else:
            image = image.resize((self.size, self.size), Image.BILINEAR)
        x = to_tensor(image)
        if rng is not None and self.augment == "pad_crop" and self.pad > 0:
            x = F.pad(x, [self.pad] * 4)
            top, left = (int(v) for v in rng.integers(0, 2 * self.pad + 1, size=2))
            x = x[:, top : top + self.size, left : left + self.size]
        if rng is not None and self.augment != "none" and self.flip and rng.random() < 0.5:
            x = x.flip(-1)
        return ((x - self.mean) / self.std).contiguous(), torch.tensor(label)

    def _center(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        short = self.size / self.resize_ratio
        scale = short / min(w, h)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        image = image.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


def random_resized_box(
    size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` of a random crop of ``size = (W, H)`` (see
    :class:`ImageTransform`)."""
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: the central crop of the closest allowed shape
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a float tensor ``(3, H, W)`` in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
