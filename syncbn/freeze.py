"""Freeze BatchNorm layers for fine-tuning: fixed statistics and affine, as detectron2's FrozenBN.

Detection and segmentation fine-tuning often freezes the backbone's BatchNorm layers: each becomes
the fixed per-channel affine map that eval mode computes,

.. math::

    y = \\frac{x - \\mu_{\\text{running}}}{\\sqrt{\\sigma^2_{\\text{running}} + \\epsilon}}
        \\gamma + \\beta,

with no parameters to train and nothing to synchronize. detectron2's
``FrozenBatchNorm2d.convert_frozen_batchnorm`` recognises ``nn.BatchNorm2d`` and
``nn.SyncBatchNorm`` by type only, so it leaves :class:`syncbn.SyncBatchNorm` layers as they are;
:func:`freeze_batchnorm` freezes every BatchNorm layer, ours included. Layers converted from
``nn.BatchNorm2d`` can also take detectron2's own path after
:func:`syncbn.revert_sync_batchnorm`, which gives them their original class back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import SyncBatchNorm
from .convert import _replace

__all__ = ["FrozenBatchNorm", "freeze_batchnorm"]


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, for input :math:`(N, C, *)`.

    The buffers ``weight``, ``bias``, ``running_mean`` and ``running_var`` (no parameters) carry
    detectron2's ``FrozenBatchNorm2d`` names, so checkpoints load either way; the output equals
    the original layer's in eval mode.

    Args:
        num_features: :math:`C`.
        eps: added to the running variance. Default: ``1e-5``
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, input: Tensor) -> Tensor:
        """The eval-mode BatchNorm of ``input`` with the frozen buffers."""
        if input.dim() < 2:
            raise ValueError(
                f"FrozenBatchNorm expected input of at least 2 dimensions (N, C, *) "
                f"(got {input.dim()}D input of shape {tuple(input.shape)})"
            )
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batchnorm(cls, module: _BatchNorm) -> FrozenBatchNorm:
        """The frozen copy of ``module``'s statistics and affine (``None`` ones as identity)."""
        if module.running_mean is None:
            raise ValueError(
                f"freeze_batchnorm expected layers with running statistics (got "
                f"{type(module).__name__} with track_running_stats=False, which normalizes with "
                f"batch statistics even in eval mode); leave it unfrozen"
            )
        frozen = cls(module.num_features, module.eps, device=module.running_mean.device)
        with torch.no_grad():
            for name in ("running_mean", "running_var", "weight", "bias"):
                value = getattr(module, name)
                if value is not None:
                    getattr(frozen, name).copy_(value.detach())
        return frozen


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` (``nn.BatchNorm*d``, ``nn.SyncBatchNorm``,
    :class:`syncbn.SyncBatchNorm`) with a :class:`FrozenBatchNorm`; return the result.

    A BatchNorm subclass with a ``forward`` of its own (a norm + activation layer such as timm's
    ``BatchNormAct2d`` or :class:`syncbn.SyncBatchNormAct`) computes more than the frozen affine:
    it raises a ``TypeError`` naming it before anything changes.

    Example::

        >>> backbone = syncbn.freeze_batchnorm(backbone)  # detectron2's FrozenBN, ours included
    """
    registry = {_BatchNorm: _freeze, SyncBatchNorm: _freeze}
    return _replace(
        module,
        candidate=lambda m: isinstance(m, _BatchNorm),
        registry=registry,
        apply=lambda fn, m: fn(m),
        strict=True,
        caller="freeze_batchnorm",
        hint="freeze its normalization yourself",
    )


def _freeze(module: _BatchNorm) -> FrozenBatchNorm:
    return FrozenBatchNorm.from_batchnorm(module)
