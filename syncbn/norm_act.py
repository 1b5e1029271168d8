r"""Batch normalization followed by an activation, as one layer: synchronized and plain.

timm builds its networks from ``BatchNormAct2d``, a ``nn.BatchNorm2d`` subclass whose ``forward``
normalizes, then applies ``self.drop`` (dropout or DropBlock, often ``nn.Identity``) and then
``self.act`` (the activation):

.. math::

    y = \mathrm{act}(\mathrm{drop}(\mathrm{BN}(x)))

Turning such a layer into a plain SyncBatchNorm, as ``nn.SyncBatchNorm.convert_sync_batchnorm``
does, silently drops ``drop`` and ``act``. :class:`SyncBatchNormAct` is the synchronized
equivalent that keeps them, and :class:`BatchNormAct` the plain one that
:func:`syncbn.revert_sync_batchnorm` falls back to when the original class is unknown. Both keep
``drop`` and ``act`` as submodules of those names, as timm does, so their ``state_dict`` keys match
timm's and checkpoints load either way (activations with parameters, e.g. ``nn.PReLU``, included).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import SyncBatchNorm
from .function import fuses_activation

# The activations the Triton kernels apply themselves (exact types: a subclass may differ).
_FUSABLE = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu"}


def _inactive(drop: nn.Module) -> bool:
    """Whether ``drop`` returns its input unchanged (identity, or dropout with ``p=0``)."""
    return type(drop) is nn.Identity or (type(drop) is nn.Dropout and drop.p == 0)


__all__ = ["BatchNormAct", "SyncBatchNormAct"]


class SyncBatchNormAct(SyncBatchNorm):
    r""":class:`syncbn.SyncBatchNorm`, then ``drop``, then ``act``: a synchronized BatchNormAct2d.

    .. math::

        y = \mathrm{act}(\mathrm{drop}(\mathrm{SyncBN}(x)))

    The normalization is exactly :class:`syncbn.SyncBatchNorm` (global batch statistics in
    training, running statistics in eval mode, the same buffers and momentum rules); ``drop`` and
    ``act`` are applied to its output on each rank. :func:`syncbn.convert_sync_batchnorm` builds
    one from timm's ``BatchNormAct2d`` (and timm's ``SyncBatchNormAct``), sharing the parameter and
    buffer tensors and reusing the very ``drop`` and ``act`` modules.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
        bias, debug, check_finite: as for :class:`syncbn.SyncBatchNorm`.
        drop: module applied to the normalized output first (e.g. ``nn.Dropout``); ``None`` for
            ``nn.Identity()``. Default: ``None``
        act: activation module applied last (e.g. ``nn.ReLU(inplace=True)``); ``None`` for
            ``nn.Identity()``. Default: ``None``

    Shape:
        - Input: :math:`(N, C, *)`; :math:`N` may differ between ranks.
        - Output: as ``act`` returns it; the same shape for elementwise activations.

    Examples::

        >>> layer = syncbn.SyncBatchNormAct(64, act=nn.ReLU(inplace=True))
        >>> model = syncbn.convert_sync_batchnorm(timm.create_model("resnet50d"))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup | None = None,
        device=None,
        dtype=None,
        *,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
        bias: bool = True,
        debug: bool | None = None,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            process_group,
            device,
            dtype,
            bias=bias,
            debug=debug,
            check_finite=check_finite,
        )
        self.drop = _module_or_identity(self, "drop", drop)
        self.act = _module_or_identity(self, "act", act)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape :math:`(N, C, *)` as SyncBatchNorm does, then drop, act.

        A synchronized training forward whose ``act`` is ``nn.ReLU``, ``nn.LeakyReLU`` or
        ``nn.SiLU`` and whose ``drop`` does nothing (``nn.Identity``, or dropout with ``p=0``)
        applies the activation inside the kernels where the kernel set can (the Triton set):
        the same values, without an extra pass over the activation or a saved output.
        """
        activation = self._activation_to_fuse(input)
        if activation is None:
            return self.act(self.drop(super().forward(input)))
        self._fused_activation = activation
        try:
            return super().forward(input)
        finally:
            self._fused_activation = None

    def _activation_to_fuse(self, input: Tensor) -> tuple[str, float] | None:
        """``(name, negative_slope)`` of ``act`` when this forward can apply it in its kernels."""
        activation = _FUSABLE.get(type(self.act))
        if activation is None or not self.training or not _inactive(self.drop):
            return None
        if not isinstance(input, Tensor) or not self._sync_world_size():
            return None
        if not fuses_activation(input):
            return None
        slope = float(self.act.negative_slope) if activation == "leaky_relu" else 0.0
        return activation, slope


class BatchNormAct(_BatchNorm):
    r"""Plain ``nn.BatchNorm`` for any input rank >= 2, then ``drop``, then ``act``.

    .. math::

        y = \mathrm{act}(\mathrm{drop}(\mathrm{BN}(x)))

    What :func:`syncbn.revert_sync_batchnorm` turns a :class:`SyncBatchNormAct` of unknown origin
    into (a layer converted from timm's ``BatchNormAct2d`` goes back to that class instead). It
    computes what timm's ``BatchNormAct2d`` computes and has the same ``state_dict`` keys.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias: as for
            ``nn.BatchNorm2d``.
        drop: module applied to the normalized output first; ``None`` for ``nn.Identity()``.
            Default: ``None``
        act: activation module applied last; ``None`` for ``nn.Identity()``. Default: ``None``
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        if affine and not bias:  # as nn.BatchNorm2d(bias=False)
            self.register_parameter("bias", None)
        self.drop = _module_or_identity(self, "drop", drop)
        self.act = _module_or_identity(self, "act", act)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"BatchNormAct expected input of at least 2 dimensions (N, C, *) "
                f"(got {input.dim()}D input of shape {tuple(input.shape)})"
            )

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape :math:`(N, C, *)` as ``nn.BatchNorm`` does; drop; act."""
        return self.act(self.drop(super().forward(input)))


def _module_or_identity(layer: nn.Module, name: str, module: nn.Module | None) -> nn.Module:
    if module is None:
        return nn.Identity()
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{type(layer).__name__} expected {name} to be an nn.Module or None (got "
            f"{type(module).__name__}); wrap a function in a module, e.g. nn.ReLU() for F.relu"
        )
    return module
