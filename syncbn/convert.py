"""Swap BatchNorm layers for SyncBatchNorm in a model, and back."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .batchnorm import SyncBatchNorm

__all__ = ["BatchNormNd", "convert_sync_batchnorm", "revert_sync_batchnorm"]


class BatchNormNd(_BatchNorm):
    """Plain ``nn.BatchNorm`` for input of any rank >= 2: what a SyncBatchNorm of unknown origin
    reverts to (SyncBatchNorm accepts every rank, so no single BatchNorm1d/2d/3d fits it)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"BatchNormNd expected input of at least 2 dimensions (N, C, *) "
                f"(got {input.dim()}D input of shape {tuple(input.shape)})"
            )


def convert_sync_batchnorm(
    module: nn.Module, process_group: ProcessGroup | None = None
) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` with :class:`SyncBatchNorm`, recursively.

    Converts ``nn.BatchNorm1d/2d/3d``, their subclasses and ``nn.SyncBatchNorm``. The new layers
    share the *same* parameter and buffer tensors (an optimizer built before the conversion keeps
    working), and keep the training flag, ``qconfig`` and the hyper-parameters. The root itself may
    be a BatchNorm layer; the converted module is returned (use the return value).

    Args:
        module: the model (or layer) to convert, in place where possible.
        process_group: group to synchronize over (``None``: the world). Default: ``None``

    Example::

        >>> model = convert_sync_batchnorm(model, process_group=new_sync_group(8))
    """
    converted = _convert(module, process_group)
    for name, layer in converted.named_modules():
        if isinstance(layer, SyncBatchNorm):
            layer.layer_name = name or type(layer).__name__  # its path, for error messages
    return converted


def _convert(module: nn.Module, process_group: ProcessGroup | None) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        return _swap(module, SyncBatchNorm, process_group=process_group)
    for name, child in module.named_children():
        converted = _convert(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module


def revert_sync_batchnorm(module: nn.Module, bn_class: type[_BatchNorm] | None = None) -> nn.Module:
    """Replace every SyncBatchNorm (ours or ``nn.SyncBatchNorm``) with a plain BatchNorm layer.

    The inverse of :func:`convert_sync_batchnorm`: a layer converted from ``nn.BatchNorm2d`` comes
    back as ``nn.BatchNorm2d``; one of unknown origin becomes :class:`BatchNormNd` (any input rank).
    Parameters and buffers are shared, not copied. The result runs and exports without
    ``torch.distributed``.

    Args:
        module: the model to revert.
        bn_class: force this BatchNorm class for every reverted layer. Default: ``None``
    """
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        target = bn_class or getattr(module, "_syncbn_source_class", None) or BatchNormNd
        return _swap(module, target)
    for name, child in module.named_children():
        reverted = revert_sync_batchnorm(child, bn_class)
        if reverted is not child:
            module.add_module(name, reverted)
    return module


def _swap(old: _BatchNorm, new_class: type[_BatchNorm], **kwargs) -> _BatchNorm:
    """A ``new_class`` layer with the hyper-parameters, tensors and flags of ``old``."""
    if any(is_lazy(t) for t in (*old.parameters(recurse=False), *old.buffers(recurse=False))):
        raise ValueError(
            f"convert_sync_batchnorm expected initialized parameters (got an uninitialized "
            f"{type(old).__name__}); run one forward pass before converting"
        )
    new = new_class(
        old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, **kwargs
    )
    # Share the tensors themselves so optimizers and hooks holding them keep working.
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = old._buffers.get(name)
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    if new_class is SyncBatchNorm and not isinstance(old, nn.SyncBatchNorm):
        new._syncbn_source_class = type(old)  # lets revert_sync_batchnorm restore it exactly
    return new
