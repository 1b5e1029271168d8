"""Image folders in ImageNet's layout: ``root/train/<class>/*`` and ``root/val/<class>/*``.

Classes are the sub-directories of ``train/`` in sorted order (label ``i`` is the ``i``-th);
``val/`` may hold a subset of them. Files are decoded with Pillow (any format it reads, converted
to RGB) in the DataLoader's workers, one sample at a time, and transformed per sample
(:class:`~.transforms.ImageTransform`).

A file Pillow cannot decode (corrupt, truncated) raises an error naming it
(``data.bad_images=error``), or (``skip``) is replaced by the next decodable file of the list,
with a warning naming it and the count of files skipped so far in this process (each DataLoader
worker counts its own). An empty class folder is a configuration error, found before training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import Splits, splits
from .transforms import ImageTransform

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class ImageFiles(Dataset):
    """``(Pillow RGB image, label)`` for each file of a list."""

    def __init__(self, files: list[Path], labels: list[int], bad_images: str = "error"):
        self.files, self.labels, self.bad_images = files, labels, bad_images
        self.skipped = 0  # bad files replaced so far (in this process)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                return _decode(self.files[i]), self.labels[i]
            except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad data
                if self.bad_images != "skip":
                    raise RuntimeError(
                        f"data=imagefolder expected an image Pillow can decode (got "
                        f"{self.files[i]}: {type(error).__name__}: {error}); fix or remove the "
                        f"file, or set data.bad_images=skip"
                    ) from error
                self.skipped += 1
                log.warning("bad image %d skipped (data.bad_images=skip): %s (%s: %s); the next "
                            "file stands in for it", self.skipped, self.files[i],
                            type(error).__name__, error)  # fmt: skip
        raise RuntimeError(f"data=imagefolder expected a decodable image (got none of "
                           f"{len(self.files)})")  # fmt: skip


def _decode(path: Path):
    with Image.open(path) as image:
        return image.convert("RGB")  # decodes the whole file: a truncated one raises here


def scan(folder: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels under ``folder/<class>/``; classes from ``folder`` unless given."""
    if not folder.is_dir():
        raise ConfigError(
            f"data=imagefolder expected a directory {folder} (got none): data.root must hold "
            f"train/<class>/* and val/<class>/* (ImageNet's layout)"
        )
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConfigError(
            f"data=imagefolder expected the classes of {folder} among the training classes "
            f"(got {unknown[:5]} not in train/); give both splits the same class folders"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        directory = folder / name
        if not directory.is_dir():
            continue
        found_here = [
            p
            for p in sorted(directory.rglob("*"))
            if p.suffix.lower() in EXTENSIONS and p.is_file()
        ]
        if not found_here:
            raise ConfigError(
                f"data=imagefolder expected images ({', '.join(EXTENSIONS)}) in every class folder "
                f"(got none in {directory}): remove the folder or add its images"
            )
        files += found_here
        labels += [label] * len(found_here)
    if not files:
        raise ConfigError(
            f"data=imagefolder expected images ({', '.join(EXTENSIONS)}) under {folder}/<class>/ "
            f"(got none in {len(found)} class folders); check data.root"
        )
    return files, labels, classes


def imagefolder(cfg, seed: int | None, augment: bool) -> Splits:
    if not cfg.root:
        raise ConfigError(
            "data=imagefolder expected data.root=DIR with train/<class>/* and val/<class>/* "
            "(got data.root=null)"
        )
    root = Path(cfg.root).expanduser()
    train_files, train_labels, classes = scan(root / "train")
    if len(classes) < 2:
        raise ConfigError(
            f"data=imagefolder expected at least 2 class folders in {root / 'train'} "
            f"(got {classes})"
        )
    val_files, val_labels, _ = scan(root / "val", classes)
    common = dict(image_size=cfg.image_size, mean=cfg.mean, std=cfg.std, flip=cfg.flip,
                  scale=cfg.scale, ratio=cfg.ratio, pad=cfg.pad,
                  resize_ratio=cfg.resize_ratio)  # fmt: skip
    return splits(
        ImageFiles(train_files, train_labels, str(cfg.bad_images)),
        ImageFiles(val_files, val_labels, str(cfg.bad_images)),
        ImageTransform(augment=str(cfg.augment), **common),
        ImageTransform(augment="none", **common),
        3, len(classes), seed, augment, class_names=classes,
    )  # fmt: skip
