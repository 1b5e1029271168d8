r"""Autograd function of synchronized batch normalization: one all-reduce forward, one backward.

Forward, for input :math:`x` of shape :math:`(N, C, *)` on rank :math:`r` of a group of :math:`W`
ranks, per channel: this rank's mean and biased variance, one all-reduce of :math:`2C + 2` float64
values (:mod:`syncbn.moments`: shifted moments, the count, a layer signature), then the global
:math:`\mu, \sigma^2` and

.. math::

    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta, \qquad
    \text{running} \leftarrow (1 - m)\,\text{running} + m\,(\mu,\ \sigma^2 \tfrac{n}{n-1}).

Backward, with :math:`\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}` and
:math:`g = \partial L / \partial y`: one all-reduce of each rank's
:math:`\frac1n [\sum g,\ \sum g (x - \mu)]` (:math:`2C` values; the sums are local, :math:`n`
global), which yields the group's means, then

.. math::

    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
        \Big( g - \frac{1}{n}\sum g - \hat x \, \frac{1}{n} \sum g \hat x \Big)

while :math:`\partial L/\partial \gamma = \sum g \hat x` and :math:`\partial L/\partial \beta =
\sum g` stay local (this rank's share): DDP averages parameter gradients, so reducing them here as
well would count them :math:`W` times.

The kernels that touch the full input come from :mod:`syncbn.kernels`; what lies between them is
done by one of two paths, chosen by the kernel set: :mod:`syncbn.stepwise` (the portable and ATen
sets: per-channel steps op by op, or compiled) or :mod:`syncbn.in_kernels` (the Triton set:
every per-channel step inside its four launches). Gradient checkpointing's rerun
(:mod:`syncbn.recompute`) takes either path's ``replay_forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from . import distributed as sbdist
from . import in_kernels, stepwise
from . import kernels as sbkernels
from .kernels import autocast_off
from .moments import MIXED_LAYERS_MESSAGE, ONE_VALUE_MESSAGE, layer_signature
from .stepwise import reads_totals_on_host  # public here since before the split

__all__ = [
    "MIXED_LAYERS_MESSAGE",
    "ONE_VALUE_MESSAGE",
    "SyncBatchNormFunction",
    "SyncSpec",
    "fuses_activation",
    "reads_totals_on_host",
    "sync_batch_norm",
]


@dataclass(frozen=True)
class SyncSpec:
    """Whom a layer synchronizes with, and how it reports trouble.

    Args:
        group: the process group (``None``: the world).
        world_size: its number of ranks.
        layer_name: the layer's name in errors (its path in the model, when converted).
        signature: the layer's :func:`syncbn.moments.layer_signature`, checked in every forward
            against what the other ranks sent.
        debug: check before each collective that every rank is at the same layer
            (:mod:`syncbn.debug`; one extra collective).
        check_finite: raise naming the layer on NaN/Inf global statistics (a host sync).
        replay: ``(mean, invstd, count)`` of an earlier forward to normalize with instead of
            reducing (:mod:`syncbn.recompute`: gradient checkpointing's rerun); ``None``: reduce.
        activation: ``(name, negative_slope)`` of an activation to apply after the affine map
            (``relu``, ``leaky_relu``, ``silu``), in the kernels; only for a kernel set that
            :func:`fuses_activation` (:class:`syncbn.SyncBatchNormAct` asks first).
    """

    group: ProcessGroup | None
    world_size: int
    layer_name: str
    signature: int
    debug: bool = False
    check_finite: bool = False
    replay: tuple[Tensor, Tensor, Tensor] | None = None  # syncbn.recompute
    activation: tuple[str, float] | None = None


def path_for(kernels):
    """The module that does what lies between ``kernels``' launches: :mod:`syncbn.in_kernels`
    for a set that owns the per-channel steps, else :mod:`syncbn.stepwise`."""
    return in_kernels if getattr(kernels, "owns_per_channel_steps", False) else stepwise


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalization over the global batch of ``group`` (the math: module docstring).

    ``forward(input, weight, bias, running_mean, running_var, momentum, eps, spec,
    num_batches_tracked=None)`` returns ``(output, mean, invstd, count)``: the output, the global
    per-channel mean and :math:`1/\\sqrt{\\sigma^2 + \\epsilon}` (float32, or float64 for
    float64 input) and the global count of values per channel (float64, 0-dim). It updates
    ``running_mean`` and ``running_var`` in place when they are given. With
    ``num_batches_tracked`` it advances that count and ``momentum`` is the layer's (``None``: the
    cumulative average); without, ``momentum`` is the weight itself (a float, or a 0-dim tensor).
    ``spec`` is the layer's :class:`SyncSpec`.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | Tensor | None,
        eps: float,
        spec: SyncSpec,
        num_batches_tracked: Tensor | None = None,
    ):
        with autocast_off(input.device.type):
            kernels = sbkernels.kernels_for(input)
            path = path_for(kernels)
            ctx.path = path
            if spec.replay is not None:  # syncbn.recompute: checkpoint's rerun, no collective
                return path.replay_forward(ctx, kernels, input, weight, bias, eps, spec)
            return path.forward(
                ctx, kernels, input, weight, bias, running_mean, running_var, momentum, eps,
                spec, num_batches_tracked,
            )  # fmt: skip

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_invstd, _grad_count):
        return ctx.path.backward(ctx, grad_output)


def fuses_activation(input: Tensor) -> bool:
    """Whether the synchronized forward of ``input`` can apply an activation in its kernels
    (the Triton set: :attr:`SyncSpec.activation`); else the caller applies it."""
    return path_for(sbkernels.kernels_for(input)) is in_kernels


def sync_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    group: ProcessGroup | None = None,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float | Tensor = 0.1,
    world_size: int | None = None,
    layer_name: str = "SyncBatchNorm",
    debug: bool = False,
    check_finite: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Functional synchronized batch norm (training mode) over ``group``.

    Returns ``(output, mean, var, count)``: the output, the global per-channel mean and biased
    variance (float32, or float64 for float64 input) and the global count of values per channel
    (float64, 0-dim); updates ``running_mean``/``running_var`` in place when given. Needs an
    initialized process group; ``world_size`` defaults to the size of ``group``.
    """
    if world_size is None:
        world_size = sbdist.get_world_size(group)
    channels = input.shape[1] if input.dim() > 1 else 0
    spec = SyncSpec(
        group, world_size, layer_name, layer_signature(layer_name, channels), debug, check_finite
    )
    output, mean, invstd, count = SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, momentum, eps, spec
    )
    var = (invstd.double().pow(-2) - eps).clamp_min_(0).to(invstd.dtype)
    return output, mean, var, count
