"""A small ResNet for 8x8 digits and 32x32 CIFAR images, built with the chosen norm layer."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

NORMS = ("syncbn", "bn", "none")


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """``bn`` and ``syncbn`` build BatchNorm2d (syncbn converts later); ``none`` builds nothing."""
    if norm in ("bn", "syncbn"):
        return nn.BatchNorm2d
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"norm expected one of {NORMS} (got {norm!r})")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; ``dilation`` for dense prediction."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module],
        dilation: int = 1,
    ):  # fmt: skip
        super().__init__()
        bias = isinstance(norm(1), nn.Identity)  # convs need a bias only without a norm
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation, bias=bias)
        self.norm1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, dilation, dilation, bias=bias)
        self.norm2 = norm(c_out)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=bias), norm(c_out))

    def forward(self, x):
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


def kaiming_init(model: nn.Module, scale: float = 1.0) -> None:
    """Kaiming init of every conv and linear layer, times ``scale``, zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            m.weight.data.mul_(scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """stem -> stages of BasicBlocks (each after the first halves the resolution) -> pool -> fc.

    Args:
        in_channels: input channels (train.py passes the dataset's).
        num_classes: outputs (train.py passes the dataset's).
        widths: channels of each stage.
        blocks_per_stage: BasicBlocks per stage.
        norm: ``bn`` or ``syncbn`` (BatchNorm2d; train.py converts for syncbn) or ``none``
            (no norm layers; convolutions get biases).
        init_scale: multiplies the Kaiming init (the initialization-sensitivity experiment).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: list[int],
        blocks_per_stage: int = 1,
        norm: str = "bn",
        init_scale: float = 1.0,
    ):
        super().__init__()
        make_norm = norm_factory(norm)
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=bias),
            make_norm(widths[0]),
            nn.ReLU(inplace=True),
        ]
        c_in = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(c_in, width, stride, make_norm))
                c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)
        )
        kaiming_init(self, init_scale)

    def forward(self, x):
        return self.head(self.features(x))
