"""A DeepLabv3-style segmentation network: dilated ResNet backbone, ASPP with image pooling.

::

    input (N, C, H, W)
      -> stem 3x3 -> BasicBlock /2 -> BasicBlock /2 -> BasicBlock dilated x2  (output stride 4)
      -> ASPP: [1x1 | 3x3 rate r1 | 3x3 rate r2 | 3x3 rate r3 | image pooling] -> concat -> 1x1
      -> 1x1 classifier -> bilinear upsampling to (H, W)

**Image pooling** averages the whole feature map to one vector per image (global context),
projects it with a 1x1 convolution and a norm layer, and broadcasts it back over the map. Its
norm layer therefore sees *one value per channel per image*: per-rank BatchNorm at one image per
rank has nothing to normalize over (``nn.BatchNorm2d`` raises "Expected more than 1 value per
channel when training"), and at two images it maps every channel to exactly ``-1`` and ``+1``
(before its affine): the branch carries one bit. SyncBN normalizes it over the global batch.
``image_pool_norm=False`` drops that norm layer (and gives the convolution a bias), as
detectron2's ASPP does ("norm is applied to all conv layers except the conv following global
average pooling"); the other norm layers stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BasicBlock, kaiming_init, norm_factory


def _conv_norm_act(c_in: int, c_out: int, kernel: int, make_norm, dilation: int = 1):
    norm = make_norm(c_out)
    bias = isinstance(norm, nn.Identity)
    padding = dilation * (kernel // 2)
    conv = nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=bias)
    return nn.Sequential(conv, norm, nn.ReLU(inplace=True))


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv -> norm -> ReLU, broadcast back to the input's size."""

    def __init__(self, c_in: int, c_out: int, make_norm):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.project = _conv_norm_act(c_in, c_out, 1, make_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(x)).expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel 1x1, dilated 3x3 (one per rate) and image
    pooling branches, concatenated and projected by a 1x1 convolution."""

    def __init__(
        self, c_in: int, c_out: int, rates: Sequence[int], make_norm, pool_norm,
    ):  # fmt: skip
        super().__init__()
        branches = [_conv_norm_act(c_in, c_out, 1, make_norm)]
        branches += [_conv_norm_act(c_in, c_out, 3, make_norm, rate) for rate in rates]
        self.branches = nn.ModuleList(branches)
        self.image_pool = ImagePooling(c_in, c_out, pool_norm)
        self.project = _conv_norm_act(c_out * (len(branches) + 1), c_out, 1, make_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.image_pool(x))
        return self.project(torch.cat(outs, dim=1))


class DeepLab(nn.Module):
    """DeepLabv3-style network for ``(N, in_channels, H, W)`` -> logits ``(N, num_classes, H, W)``.

    Args:
        in_channels: input channels (train.py passes the dataset's).
        num_classes: classes, background included (train.py passes the dataset's).
        norm: ``bn``/``syncbn`` (BatchNorm2d; train.py converts for syncbn) or ``none``.
        widths: channels of the stem and the three backbone blocks' stages.
        rates: dilation rates of ASPP's 3x3 branches (at output stride 4).
        aspp_channels: channels of each ASPP branch and of its projection.
        image_pool_norm: a norm layer in the image-pooling branch (see the module docstring).
        init_scale: multiplies the Kaiming init.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm: str = "bn",
        widths: Sequence[int] = (16, 32, 64),
        rates: Sequence[int] = (2, 4, 6),
        aspp_channels: int = 32,
        image_pool_norm: bool = True,
        init_scale: float = 1.0,
    ):
        super().__init__()
        make_norm = norm_factory(norm)
        w0, w1, w2 = widths
        self.norm, self.image_pool_norm = norm, image_pool_norm
        self.backbone = nn.Sequential(
            _conv_norm_act(in_channels, w0, 3, make_norm),
            BasicBlock(w0, w1, 2, make_norm),
            BasicBlock(w1, w2, 2, make_norm),
            BasicBlock(w2, w2, 1, make_norm, dilation=2),
        )
        pool_norm = make_norm if image_pool_norm else norm_factory("none")
        self.aspp = ASPP(w2, aspp_channels, rates, make_norm, pool_norm)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
        kaiming_init(self, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.aspp(self.backbone(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def check_batch(self, images_per_norm_batch: int) -> str | None:
        """Why this model cannot train when a norm layer sees ``images_per_norm_batch`` images
        (per-rank BN at one image: the image-pooling branch), or None."""
        if self.norm == "bn" and self.image_pool_norm and images_per_norm_batch < 2:
            return (
                "its image-pooling branch's BatchNorm would see one value per channel, which "
                "nn.BatchNorm2d refuses in training ('Expected more than 1 value per channel'); "
                "use norm=syncbn, or model.image_pool_norm=false (no norm in that branch, as in "
                "detectron2's DeepLab), or 2 or more images per rank"
            )
        return None
