"""Tasks: losses and metrics against independent implementations (PyTorch's own cross-entropy,
scikit-learn's top-k accuracy, confusion matrix and Jaccard index), on one and two gloo ranks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import jaccard_score, top_k_accuracy_score

from syncbn.training import tasks

IGNORE = 255


def _task(name: str, classes: int, label_smoothing: float = 0.0):
    cfg = SimpleNamespace(name=name, label_smoothing=label_smoothing, ignore_index=IGNORE)
    data = SimpleNamespace(num_classes=classes, ignore_index=IGNORE if name == "segmentation"
                           else None)  # fmt: skip
    return tasks.build(cfg, data)


def _classification_data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(50, 12, generator=gen), torch.randint(0, 12, (50,), generator=gen)


def _segmentation_data(seed: int, classes: int = 5):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, classes, 6, 7, generator=gen)
    target = torch.randint(0, classes, (3, 6, 7), generator=gen)
    target[torch.rand(3, 6, 7, generator=gen) < 0.2] = IGNORE
    target[target == 4] = 3  # class 4: predicted here and there, never labelled
    return logits, target


def test_classification_loss_smooths_labels_and_metrics_match_scikit_learn():
    task = _task("classification", 12, label_smoothing=0.1)
    logits, target = _classification_data(0)
    loss, count = task.loss(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, label_smoothing=0.1))
    assert count == 50
    meter = task.meter(torch.device("cpu"))
    meter.update(logits[:20], target[:20])
    meter.update(logits[20:], target[20:])
    metrics = meter.compute(1)
    labels = list(range(12))
    assert metrics["acc"] == pytest.approx(top_k_accuracy_score(target, logits, k=1, labels=labels))
    assert metrics["top5"] == pytest.approx(
        top_k_accuracy_score(target, logits, k=5, labels=labels)
    )
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    assert metrics["count"] == 50


def test_segmentation_loss_counts_labelled_pixels_only_and_an_empty_batch_is_zero_not_nan():
    task = _task("segmentation", 5, label_smoothing=0.05)
    logits, target = _segmentation_data(1)
    loss, count = task.loss(logits, target)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=0.05)
    torch.testing.assert_close(loss, expected)
    assert count == (target != IGNORE).sum()
    loss, count = task.loss(logits, torch.full_like(target, IGNORE))
    assert loss.item() == 0.0 and count.item() == 0


def _independent_segmentation_metrics(logits: torch.Tensor, target: torch.Tensor, classes: int):
    labelled = target != IGNORE
    y_true = target[labelled].numpy()
    y_pred = logits.argmax(1)[labelled].numpy()
    present = np.union1d(y_true, y_pred)  # classes in the labels or the predictions
    iou = jaccard_score(y_true, y_pred, labels=present, average=None)
    return {
        "miou": float(np.mean(iou)),
        "iou": dict(zip(present.tolist(), iou.tolist(), strict=True)),
        "acc": float(np.mean(y_true == y_pred)),
        "loss": F.cross_entropy(logits, target, ignore_index=IGNORE).item(),
        "count": int(labelled.sum()),
    }


def _segmentation_meter_on_ranks() -> dict:
    rank = dist.get_rank()
    logits, target = _segmentation_data(10 + rank)
    meter = _task("segmentation", 5).meter(torch.device("cpu"))
    meter.update(logits[:1], target[:1])
    meter.update(logits[1:], target[1:])
    return meter.compute(dist.get_world_size())


@pytest.mark.parametrize("world_size", [1, 2])
def test_mean_iou_over_ranks_matches_scikit_learn_on_the_gathered_pixels(run_ranks, world_size):
    results = run_ranks(_segmentation_meter_on_ranks, world_size)
    data = [_segmentation_data(10 + r) for r in range(world_size)]
    logits = torch.cat([d[0] for d in data])
    target = torch.cat([d[1] for d in data])
    expected = _independent_segmentation_metrics(logits, target, 5)
    assert 4 in expected["iou"]  # a class only predicted: IoU 0, counted
    for metrics in results:
        assert metrics["miou"] == pytest.approx(expected["miou"], rel=1e-9)
        assert metrics["acc"] == pytest.approx(expected["acc"], rel=1e-9)
        assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert metrics["count"] == expected["count"]
        for c, value in enumerate(metrics["iou"]):
            if c in expected["iou"]:
                assert value == pytest.approx(expected["iou"][c], rel=1e-9)
            else:
                assert value is None


def test_a_task_refuses_data_it_cannot_read_and_the_config_check_says_so():
    from syncbn.training.config import validate
    from syncbn.training.errors import ConfigError
    from tests.support.config import compose_config

    with pytest.raises(ConfigError, match=r"task=segmentation expected data from \['digit_scenes'"):
        validate(compose_config("task=segmentation", "data=digits"), world_size=1, cuda=False)
    with pytest.raises(ConfigError, match=r"task=classification expected data from"):
        validate(compose_config("data=digit_scenes"), world_size=1, cuda=False)


def test_resume_refuses_another_task_and_lets_label_smoothing_change():
    from syncbn.training.errors import ConfigError
    from syncbn.training.state import resume_policy

    saved = {"task": {"name": "segmentation", "label_smoothing": 0.0, "ignore_index": 255}}
    changed = {"task": {"name": "segmentation", "label_smoothing": 0.1, "ignore_index": 255}}
    assert resume_policy.check("ck.pt", saved, changed) == {"task.label_smoothing": (0.0, 0.1)}
    other = {"task": {"name": "classification", "label_smoothing": 0.0, "ignore_index": 255}}
    with pytest.raises(ConfigError, match=r"for task.name \(got task.name: checkpoint"):
        resume_policy.check("ck.pt", saved, other)
