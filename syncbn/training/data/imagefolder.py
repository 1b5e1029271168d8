"""Image folders in ImageNet's layout: ``root/train/<class>/*`` and ``root/val/<class>/*``.

Classes are the sub-directories of ``train/`` in sorted order (label ``i`` is the ``i``-th);
``val/`` may hold a subset of them. Files are decoded with Pillow (any format it reads, converted
to RGB) in the DataLoader's workers, one sample at a time, and transformed per sample
(:class:`~.transforms.ImageTransform`).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import Splits, splits
from .transforms import ImageTransform

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class ImageFiles(Dataset):
    """``(Pillow RGB image, label)`` for each file of a list."""

    def __init__(self, files: list[Path], labels: list[int]):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        with Image.open(self.files[index]) as image:
            return image.convert("RGB"), self.labels[index]


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
        for path in sorted(directory.rglob("*")):
            if path.suffix.lower() in EXTENSIONS and path.is_file():
                files.append(path)
                labels.append(label)
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
        ImageFiles(train_files, train_labels), ImageFiles(val_files, val_labels),
        ImageTransform(augment=str(cfg.augment), **common),
        ImageTransform(augment="none", **common),
        3, len(classes), seed, augment, class_names=classes,
    )  # fmt: skip
