"""Models that tests build by import path (``model._target_=tests.support.toy_models.X``), the
way users name their own classes, torchvision's or timm's (which cannot be imported next to CPU
torch)."""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """A class that names ``in_channels`` and ``num_classes`` and builds its own BatchNorm."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(width, num_classes)
        self.built_with = {"in_channels": in_channels, "num_classes": num_classes, "width": width}

    def forward(self, x):
        return self.fc(self.body(x))


def tiny_factory(depth: int = 1, **kwargs) -> nn.Module:
    """A factory taking ``**kwargs``, like ``torchvision.models.resnet50(**kwargs)``: it is told
    ``num_classes`` only (a ``**kwargs`` may not accept ``in_channels``)."""
    net = TinyNet(in_channels=kwargs.pop("in_chans", 1), **kwargs)
    net.built_with["depth"] = depth
    return net


class TimmStyle(TinyNet):
    """timm's names: ``in_chans`` and ``num_classes``."""

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, width: int = 8):
        super().__init__(in_chans, num_classes, width)


def not_a_module(num_classes: int):
    return [num_classes]
