"""A small ResNet for 8x8 digits and 32x32 CIFAR images, built with the chosen norm layer."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..batchnorm import SyncBatchNorm
from ..convert import convert_sync_batchnorm
from ..distributed import new_sync_group

NORMS = ("syncbn", "bn", "none")


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """``bn`` and ``syncbn`` build BatchNorm2d (syncbn converts later); ``none`` builds nothing."""
    if norm in ("bn", "syncbn"):
        return nn.BatchNorm2d
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"norm expected one of {NORMS} (got {norm!r})")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        bias = isinstance(norm(1), nn.Identity)  # convs need a bias only without a norm
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)
        self.norm1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        self.norm2 = norm(c_out)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=bias), norm(c_out))

    def forward(self, x):
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem -> stages of BasicBlocks (each after the first halves the resolution) -> pool -> fc."""

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
        self._init(init_scale)

    def _init(self, scale: float) -> None:
        """Kaiming init times ``scale``: the knob of the initialization-sensitivity experiment."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.data.mul_(scale)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.head(self.features(x))


def build_model(
    cfg,
    norm: str,
    in_channels: int,
    num_classes: int,
    sync_group_size=None,
    debug: bool | None = None,
    check_finite: bool | None = None,
):
    """The configured model; with ``norm=syncbn`` its BatchNorms become SyncBatchNorm.

    ``debug`` and ``check_finite`` switch SyncBatchNorm's checks on or off (``None``: the
    ``SYNCBN_DEBUG`` / ``SYNCBN_CHECK_FINITE`` environment decides).
    """
    model = ResNet(
        in_channels,
        num_classes,
        widths=list(cfg.widths),
        blocks_per_stage=cfg.blocks_per_stage,
        norm=norm,
        init_scale=cfg.init_scale,
    )
    if norm == "syncbn":
        group = new_sync_group(sync_group_size) if sync_group_size else None
        model = convert_sync_batchnorm(model, process_group=group)
        for layer in model.modules():
            if isinstance(layer, SyncBatchNorm):
                if debug is not None:
                    layer.debug = bool(debug)
                if check_finite is not None:
                    layer.check_finite = bool(check_finite)
    return model
