r"""Semantic segmentation: per-pixel cross-entropy with ``ignore_index``, mean IoU.

The loss of a batch is the mean over its labelled pixels (those whose target is not
``ignore_index``); under DDP each rank averages over its own pixels and DDP averages the
gradients, as torchvision's and mmsegmentation's recipes do. Evaluation accumulates the
confusion matrix :math:`M_{ij}` (pixels of class :math:`i` predicted :math:`j`) over the whole
validation split on all ranks, then

.. math::

    \text{IoU}_c = \frac{M_{cc}}{\sum_j M_{cj} + \sum_i M_{ic} - M_{cc}}, \qquad
    \text{mIoU} = \frac{1}{|\{c : \text{union}_c > 0\}|} \sum_{c:\, \text{union}_c > 0}
    \text{IoU}_c

(classes absent from both the labels and the predictions are left out), and the pixel accuracy
``acc`` :math:`= \sum_c M_{cc} / \sum_{ij} M_{ij}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Meter, Task


class SegmentationMeter(Meter):
    """``[loss sum, labelled pixels, confusion matrix (C x C, flattened)]``."""

    def __init__(self, device: torch.device, num_classes: int, ignore_index: int):
        super().__init__(2 + num_classes * num_classes, device)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        logits = output.float()
        c = self.num_classes
        loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
        labelled = target != self.ignore_index
        pairs = target[labelled] * c + logits.argmax(1)[labelled]
        confusion = torch.bincount(pairs, minlength=c * c)
        self.sums[0] += loss.double()
        self.sums[1] += labelled.sum().double()
        self.sums[2:] += confusion.double()

    def metrics(self, sums: torch.Tensor) -> dict:
        loss, count = sums[0].item(), max(sums[1].item(), 1.0)
        confusion = sums[2:].view(self.num_classes, self.num_classes)
        tp = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - tp
        iou = tp / union.clamp(min=1)
        present = union > 0
        miou = iou[present].mean().item() if present.any() else 0.0
        return {
            "loss": loss / count,
            "acc": tp.sum().item() / count,
            "miou": miou,
            "iou": [v if p else None for v, p in zip(iou.tolist(), present.tolist(), strict=True)],
            "count": int(sums[1].item()),
        }


class Segmentation(Task):
    """``(N, C, H, W)`` logits against ``(N, H, W)`` class indices; ``ignore_index``: unlabelled."""

    name = "segmentation"
    datasets = ("digit_scenes",)
    primary = "miou"

    def __init__(self, cfg, splits):
        super().__init__(cfg, splits)
        if splits.ignore_index is not None and splits.ignore_index != cfg.ignore_index:
            raise ConfigError(
                f"task.ignore_index expected the data's ignore_index {splits.ignore_index} "
                f"(got {cfg.ignore_index}); set both to the same value"
            )
        self.ignore_index = int(cfg.ignore_index)

    def loss(self, output: torch.Tensor, target: torch.Tensor):
        """The mean over labelled pixels (0, not NaN, when a batch has none) and their count."""
        total = F.cross_entropy(output.float(), target, ignore_index=self.ignore_index,
                                label_smoothing=self.label_smoothing, reduction="sum")  # fmt: skip
        count = (target != self.ignore_index).sum()
        return total / count.clamp(min=1), count

    def meter(self, device: torch.device) -> Meter:
        return SegmentationMeter(device, self.num_classes, self.ignore_index)

    def describe(self, metrics: dict) -> str:
        return f"val_miou {metrics['miou']:.4f} val_acc {metrics['acc']:.4f}"
