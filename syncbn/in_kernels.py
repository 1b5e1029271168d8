r"""The forward and backward with a kernel set that does every per-channel step inside its
launches (:class:`~syncbn.kernels.triton_set.TritonKernels`): moments -> all-reduce -> normalize;
backward reduce -> all-reduce -> input gradient. Four launches and two all-reduces per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import debug as sbdebug
from . import kernels as sbkernels
from .distributed import reduce_for_layer
from .kernels import autocast_off, dense

if TYPE_CHECKING:
    from .function import SyncSpec

__all__ = ["backward", "forward", "replay_forward"]


def forward(
    ctx, kernels, input, weight, bias, running_mean, running_var, momentum, eps, spec, batches
):
    """The forward with a kernel set that does every per-channel step inside its two launches
    (:class:`~syncbn.kernels.triton_set.TritonKernels`): moments -> all-reduce -> normalize.
    ``momentum`` is the layer's (``None``: cumulative); ``batches`` its num_batches_tracked,
    which the kernels advance."""
    x = input
    channels = x.shape[1]
    buffer, shift = kernels.pack_moments(x, running_mean, batches, spec.signature, spec.layer_name)
    if spec.debug and not torch.compiler.is_compiling():
        sbdebug.check_same_call(spec.layer_name, channels, x.dtype, "forward", spec.group, x.device)
    buffer = reduce_for_layer(buffer, spec.group, spec.layer_name, "forward")
    if spec.check_finite and not torch.compiler.is_compiling():  # before any update
        q, p = buffer[: 2 * channels].view(2, channels)
        sbdebug.check_finite_statistics(spec.layer_name, p, q, x)
    output, mean, invstd = kernels.normalize_with_global_statistics(
        x, buffer, shift, weight, bias, running_mean, running_var, batches, momentum, eps,
        spec.world_size * spec.signature, spec.signature, spec.activation,
    )  # fmt: skip
    if not x.is_cuda and not torch.compiler.is_compiling():  # a free host read: fail here
        sbkernels.raise_device_errors(x.device)
    ctx.set_materialize_grads(False)
    ctx.kernels = kernels
    ctx.spec = spec
    ctx.save_for_backward(x, weight, bias, mean, invstd, buffer)
    total = buffer[2 * channels]
    mean = mean[0]  # (2, C): the float32 mean and its remainder, kept for backward
    if torch.compiler.is_compiling():  # a graph may not return views of what it saves
        mean, total = mean.clone(), total.clone()
    ctx.mark_non_differentiable(mean, invstd, total)
    return output, mean, invstd, total


def backward(ctx, grad_output):
    """The backward with such a set: local sums -> all-reduce of the shares -> input gradient;
    the parameter gradients are this rank's sums (DDP averages them)."""
    x, weight, bias, mean, invstd, buffer = ctx.saved_tensors  # bias: for an activation's input
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    kernels, spec = ctx.kernels, ctx.spec
    dy = grad_output if grad_output is not None else torch.zeros_like(x)
    with autocast_off(x.device.type):
        if not kernels.covers(dy):  # a gradient whose layout the kernels cannot address
            dy = dense(dy, like=x)
        shares, grad_weight, grad_bias = kernels.backward_shares(
            dy, x, mean, invstd, buffer, weight,
            need_weight and weight is not None, need_bias and bias is not None,
            bias, spec.activation,
        )  # fmt: skip
        if spec.debug and not torch.compiler.is_compiling():
            sbdebug.check_same_call(
                spec.layer_name, x.shape[1], shares.dtype, "backward", spec.group, x.device
            )
        means = reduce_for_layer(shares, spec.group, spec.layer_name, "backward")
        grad_input = None
        if need_input:
            grad_input = kernels.grad_input(
                dy, x, mean, invstd, weight, means, bias, spec.activation
            )
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def replay_forward(ctx, kernels, x, weight, bias, eps: float, spec: SyncSpec):
    """Gradient checkpointing's rerun (``spec.replay``, :mod:`syncbn.recompute`): the normalize
    kernel reads a buffer made from the earlier statistics (and updates nothing)."""
    mean, invstd, total = spec.replay
    expected = spec.world_size * spec.signature
    buffer, shift = kernels.replay_buffer(mean, invstd, total, eps, expected)
    output, saved_mean, saved_invstd = kernels.normalize_with_global_statistics(
        x, buffer, shift, weight, bias, None, None, None, None, eps, expected, spec.signature,
        spec.activation,
    )  # fmt: skip
    ctx.set_materialize_grads(False)
    ctx.kernels, ctx.spec = kernels, spec
    ctx.save_for_backward(x, weight, bias, saved_mean, saved_invstd, buffer)
    mean, invstd, total = mean.clone(), invstd.clone(), total.clone()
    ctx.mark_non_differentiable(mean, invstd, total)
    return output, mean, invstd, total
