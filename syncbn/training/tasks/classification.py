"""Image classification: cross-entropy (with optional label smoothing), top-1 and top-5."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Meter, Task


class ClassificationMeter(Meter):
    """``[loss sum, top-1 correct, top-k correct, count]``; the loss without label smoothing."""

    def __init__(self, device: torch.device, topk: int):
        super().__init__(4, device)
        self.topk = topk

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        logits = output.float()
        top = logits.topk(self.topk, dim=1).indices  # (N, k), best first
        hits = top == target[:, None]
        self.sums += torch.stack([
            F.cross_entropy(logits, target, reduction="sum").double(),
            hits[:, 0].sum().double(),
            hits.any(dim=1).sum().double(),
            torch.tensor(float(len(target)), dtype=torch.float64, device=target.device),
        ])  # fmt: skip

    def metrics(self, sums: torch.Tensor) -> dict:
        loss, top1, topk, count = sums.tolist()
        count = max(count, 1.0)
        return {"loss": loss / count, "acc": top1 / count, "top5": topk / count,
                "count": int(count)}  # fmt: skip


class Classification(Task):
    """``(N, C)`` logits against ``(N,)`` class indices.

    ``top5`` is top-min(5, classes): with fewer than 5 classes it is 1.0 by definition.
    """

    name = "classification"
    datasets = ("digits", "synthetic", "cifar10", "imagefolder")
    primary = "acc"

    def loss(self, output: torch.Tensor, target: torch.Tensor):
        loss = F.cross_entropy(output.float(), target, label_smoothing=self.label_smoothing)
        return loss, len(target)

    def meter(self, device: torch.device) -> Meter:
        return ClassificationMeter(device, min(5, self.num_classes))

    def describe(self, metrics: dict) -> str:
        return f"val_acc {metrics['acc']:.4f} val_top5 {metrics['top5']:.4f}"
