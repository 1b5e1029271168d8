"""Datasets and loaders: normalization from the training split only, per-sample augmentation
that depends on (seed, epoch, sample) alone, image folders of real PNG files, digit scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from syncbn.training import data
from syncbn.training.data import memory
from syncbn.training.data.memory import split_indices
from syncbn.training.data.transforms import ShiftFlip, random_resized_box, shift
from syncbn.training.errors import ConfigError
from tests.support.config import compose_config
from tests.support.images import write_image_folder

# ----------------------------------------------------------------------------- normalization


def test_digits_are_normalized_with_training_statistics_only():
    """The training split has mean 0 and std 1 exactly; validation images are the raw ones
    under the same map. Statistics over both splits (a leak) fail the first check."""
    cfg = compose_config().data
    splits = data.load(cfg, augment=False)
    train = torch.stack([splits.train_eval[i][0] for i in range(len(splits.train_eval))])
    val = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    assert abs(train.mean().item()) < 1e-6 and abs(train.std().item() - 1) < 1e-6

    raw = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1)
    train_ids, val_ids = split_indices(len(raw), cfg.val_fraction, cfg.split_seed)
    assert len(train) == len(train_ids) and len(val) == len(val_ids)
    mean, std = raw[train_ids].double().mean(), raw[train_ids].double().std()
    torch.testing.assert_close(val.double() * std + mean, raw[val_ids].double(), atol=1e-4,
                               rtol=0)  # fmt: skip


@pytest.mark.parametrize("overrides", [["task=segmentation"], ["data=synthetic"]])
def test_other_in_memory_data_is_normalized_with_training_statistics_only(overrides):
    splits = data.load(compose_config(*overrides).data, augment=False)
    train = torch.stack([splits.train_eval[i][0] for i in range(len(splits.train_eval))])
    val = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    assert abs(train.mean().item()) < 1e-5 and abs(train.std().item() - 1) < 1e-5
    assert abs(val.mean().item()) > 1e-4  # the validation split is mapped, not re-centred


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_is_per_sample_and_depends_on_seed_epoch_and_sample_only():
    splits = data.load(compose_config().data, seed=7, augment=True)
    plain = splits.train_eval
    a, b = splits.train[(5, 2)], splits.train[(5, 2)]
    assert torch.equal(a[0], b[0])  # the same key, the same draw: any worker, any rank
    moved = [not torch.equal(splits.train[(5, e)][0], plain[5][0]) for e in range(8)]
    assert 2 <= sum(moved) <= 8  # 1-pixel shifts: most epochs move the image
    draws = {tuple(splits.train[(i, 0)][0].flatten()[:64].tolist()) for i in range(40)}
    assert len(draws) == 40
    other_seed = data.load(compose_config().data, seed=8, augment=True).train
    assert any(not torch.equal(other_seed[(i, 0)][0], splits.train[(i, 0)][0]) for i in range(8))


def test_a_batch_is_the_same_whatever_loads_it():
    """workers=0 or 1 (a separate process), this batch or another: the same samples."""
    splits = data.load(compose_config().data, seed=3, augment=True)
    batches = []
    for workers in (0, 1):
        loader_cfg = compose_config(f"loader.workers={workers}").loader
        loader = data.train_loader(splits.train, 8, 0, 1, 3, loader_cfg)
        loader.sampler.set_epoch(1, start=16)
        batches.append(next(iter(loader)))
    torch.testing.assert_close(batches[0], batches[1], rtol=0, atol=0)
    keys = list(data.EpochSampler(len(splits.train), 0, 1, 8, 3).__iter__())[:1]
    assert keys[0][1] == 0  # (index, epoch) keys


def test_shift_moves_content_and_fills_the_uncovered_border():
    x = torch.arange(1.0, 26.0).view(1, 5, 5)
    for dx, dy in [(2, 0), (0, -1), (-3, 2), (5, 5), (-6, 1)]:
        expected = torch.full_like(x, -1.0)
        for i in range(5):
            for j in range(5):
                if 0 <= i - dy < 5 and 0 <= j - dx < 5:
                    expected[0, i, j] = x[0, i - dy, j - dx]
        torch.testing.assert_close(shift(x, dx, dy, -1.0), expected)


def test_a_mask_moves_with_its_image():
    image = torch.zeros(1, 16, 16)
    image[0, 4:8, 5:9] = 1.0
    mask = (image[0] > 0).long() * 3
    transform = ShiftFlip(4, flip=True, fill=0.0, target_fill=0)
    for seed in range(20):
        x, y = transform((image, mask), np.random.default_rng(seed))
        assert torch.equal((x[0] > 0).long() * 3, y)


def test_random_resized_boxes_stay_inside_and_respect_area_and_ratio():
    rng = np.random.default_rng(0)
    for size in [(50, 40), (300, 200), (20, 300)]:
        for _ in range(200):
            left, top, right, bottom = random_resized_box(size, (0.08, 1.0), (0.75, 4 / 3), rng)
            w, h = right - left, bottom - top
            assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
            if (w, h) != size:  # the fallback crop may break the bounds below, by design
                assert 0.07 <= w * h / (size[0] * size[1]) <= 1.0
                assert 0.7 <= w / h <= 1.4


# ----------------------------------------------------------------------------- image folders


def test_image_folder_reads_png_files_with_labels_by_sorted_class(tmp_path):
    root = write_image_folder(tmp_path / "images")
    cfg = compose_config("data=imagefolder", f"data.root={root}", "data.image_size=16").data
    splits = data.load(cfg, seed=0, augment=True)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (12, 6, 3)
    assert splits.class_names == ["cat", "dog", "emu"]
    for dataset in (splits.val, splits.train):
        for i in range(len(dataset)):
            x, y = dataset[(i, 0)] if dataset is splits.train else dataset[i]
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32
            raw = x * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)
            assert int(raw.mean(dim=(1, 2)).argmax()) == int(y)  # the label is its colour
    assert torch.equal(splits.val[1][0], splits.val[1][0])  # evaluation is deterministic


def test_a_missing_or_empty_image_folder_is_an_error_naming_the_path(tmp_path):
    cfg = compose_config("data=imagefolder", f"data.root={tmp_path / 'nowhere'}").data
    with pytest.raises(ConfigError, match=rf"expected a directory {tmp_path / 'nowhere'}/train"):
        data.load(cfg)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    cfg = compose_config("data=imagefolder", f"data.root={tmp_path / 'empty'}").data
    with pytest.raises(ConfigError, match=rf"got none in {tmp_path / 'empty'}/train/cat\)"):
        data.load(cfg)
    root = write_image_folder(tmp_path / "odd")
    (root / "val" / "yak").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "yak" / "0.png")
    cfg = compose_config("data=imagefolder", f"data.root={root}").data
    with pytest.raises(ConfigError, match=r"\['yak'\] not in train/"):
        data.load(cfg)


# ----------------------------------------------------------------------------- digit scenes


def test_digit_scenes_label_every_pixel_by_its_digit_background_or_rim():
    cfg = compose_config("task=segmentation", "data.num_train=30", "data.num_val=10").data
    splits = data.load(cfg, augment=False)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (30, 10, 11)
    for dataset in (splits.train_eval, splits.val):
        for i in range(len(dataset)):
            x, y = dataset[i]
            assert x.shape == (1, cfg.canvas, cfg.canvas) and y.shape == (cfg.canvas, cfg.canvas)
            digits = y[(y != 0) & (y != cfg.ignore_index)].unique()
            assert 1 <= len(digits) <= cfg.digits_per_image[1]
            assert set(y.unique().tolist()) <= {*range(11), cfg.ignore_index}
            bright, dark = x[0][(y >= 1) & (y <= 10)], x[0][y == 0]
            assert bright.min() > dark.max()  # digit pixels are brighter than any background


def test_digits_are_read_from_scikit_learns_data_file_exactly():
    """The loader reads the bundled file without importing scikit-learn (a second per process):
    the same images and labels as sklearn.datasets.load_digits."""
    images, labels = memory.load_digits()
    reference = load_digits()
    assert torch.equal(images, torch.tensor(reference.images, dtype=torch.float32))
    assert torch.equal(labels, torch.tensor(reference.target, dtype=torch.long))
