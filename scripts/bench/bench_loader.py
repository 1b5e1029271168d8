"""Is the image-folder loader or the training step the bottleneck? Images per second of each.

Builds an image folder of real images in ImageNet's layout (or reads ``--root``): scikit-learn's
handwritten digits, placed on a canvas, coloured, upscaled and written as JPEG (``--size``, e.g.
320x240 like a small ImageNet photo) or PNG. Then measures, on this machine:

- the loader: train.py's training DataLoader over that folder (Pillow decode, per-sample random
  resized crop to ``--image-size``, flip, normalize, collate; ``EpochSampler`` keys) with 0, 1 and
  2 worker processes (persistent, prefetch 2), images per second over ``--batches`` batches after
  one warm-up batch;
- the step: a training step (forward, backward, SGD) of a model on in-memory tensors of the same
  shape, one process, images per second (median of rounds).

Writes ``--out`` (JSON) and prints a table::

    python scripts/bench/bench_loader.py                             # ~2 minutes on 2 CPU cores
    python scripts/bench/bench_loader.py --root /data/imagenet       # your folder
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from syncbn.training import data
from syncbn.training.models import build_model

ROOT = Path(__file__).resolve().parents[2]


def write_folder(root: Path, count: int, size: tuple[int, int], fmt: str) -> None:
    """``count`` coloured digit scenes as ``root/{train,val}/<digit>/*.{jpg,png}``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(count):
        label = int(digits.target[i % len(digits.target)])
        canvas = np.zeros((max(height // 4, 40), max(width // 4, 40)), dtype=np.float32)
        digit = np.kron(digits.images[i % len(digits.images)], np.ones((4, 4)))  # 32x32
        top = rng.integers(0, canvas.shape[0] - 32)
        left = rng.integers(0, canvas.shape[1] - 32)
        canvas[top : top + 32, left : left + 32] = digit / 16
        colour = rng.uniform(0.3, 1.0, 3)
        pixels = canvas[..., None] * colour + rng.uniform(0, 0.15, (*canvas.shape, 3))
        image = Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8)).resize(size)
        folder = root / ("val" if i % 10 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "jpg":
            image.save(folder / f"{i}.jpg", quality=90)
        else:
            image.save(folder / f"{i}.png")


def loader_rate(root: Path, image_size: int, workers: int, batch: int, batches: int) -> float:
    cfg = OmegaConf.create({
        "name": "imagefolder", "root": str(root), "image_size": image_size,
        "augment": "random_resized_crop", "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
        "pad": 4, "flip": True, "resize_ratio": 0.875,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    })  # fmt: skip
    splits = data.load(cfg, seed=0, augment=True)
    loader_cfg = OmegaConf.create({"workers": workers, "pin_memory": False,
                                   "persistent_workers": True, "prefetch_factor": 2})  # fmt: skip
    loader = data.train_loader(splits.train, batch, 0, 1, 0, loader_cfg)
    seen, started = 0, None
    epoch = 0
    while seen < batch * batches:
        loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            if started is None:  # the first batch pays for starting the workers
                started = time.perf_counter()
                continue
            seen += len(x)
            if seen >= batch * batches:
                break
        epoch += 1
    return seen / (time.perf_counter() - started)


def step_rate(model_cfg: dict, image_size: int, batch: int, rounds: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(OmegaConf.create(model_cfg), "bn", 3, 10).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - started) / steps)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="an image folder (train/<class>/*); default: build one")
    parser.add_argument("--images", type=int, default=600, help="images to build")
    parser.add_argument("--size", type=int, nargs=2, default=[320, 240], help="built W H")
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    parser.add_argument("--image-size", type=int, default=224, help="training crop")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="measured loader batches")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="results/bench_loader.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "images"
        if not args.root:
            write_folder(root, args.images, tuple(args.size), args.format)
        loader = {w: loader_rate(root, args.image_size, w, args.batch, args.batches)
                  for w in args.workers}  # fmt: skip
    models = {
        "resnet_small (train.py's default, 2 stages)": {
            "_target_": "syncbn.training.models.ResNet", "widths": [32, 64],
            "blocks_per_stage": 1,
        },
        "resnet_cifar (3 stages x 2 blocks)": {
            "_target_": "syncbn.training.models.ResNet", "widths": [32, 64, 128],
            "blocks_per_stage": 2,
        },
    }  # fmt: skip
    steps = {name: step_rate(cfg, args.image_size, args.batch, rounds=3, steps=2)
             for name, cfg in models.items()}  # fmt: skip
    report = {
        "date": date.today().isoformat(),
        "command": " ".join(["python", "scripts/bench/bench_loader.py", *sys.argv[1:]]),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "images": "built" if not args.root else args.root,
        "size": args.size, "format": args.format, "image_size": args.image_size,
        "batch": args.batch,
        "loader_images_per_s": {str(w): rate for w, rate in loader.items()},
        "step_images_per_s": steps,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"| {args.size[0]}x{args.size[1]} {args.format} -> {args.image_size}, batch "
          f"{args.batch} | images/s |\n|---|---|")  # fmt: skip
    for w, rate in loader.items():
        print(f"| loader, {w} workers | {rate:.0f} |")
    for name, rate in steps.items():
        print(f"| training step, {name} | {rate:.1f} |")


if __name__ == "__main__":
    main()
