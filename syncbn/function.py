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

The kernels that touch the full input come from :mod:`syncbn.kernels` (PyTorch's fused CUDA
kernels in eager mode on CUDA, composite ops on CPU and under ``torch.compile``); the global
count is read on the host only on CPU, where that is free. On CUDA nothing synchronizes with the
host: empty ranks branch on the shape (known on the host), an empty *global* batch is handled by
arithmetic on device, and the two checks on the reduced buffer (one value per channel, ranks at
different layers) are device-side assertions (``torch._assert_async``), so a training step can be
captured in a CUDA graph. The per-channel arithmetic between the kernels is three step functions
(:func:`~syncbn.moments.pack`, :func:`_global_statistics_on_device`, :func:`_shares_of_means`)
that the CUDA kernel set can compile into one kernel each (``SYNCBN_FUSE_STEPS=1``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from . import debug as sbdebug
from . import distributed as sbdist
from . import kernels as sbkernels
from .distributed import all_reduce_sum
from .kernels import channel_view, memory_format, reduce_dims, stat_dtype
from .moments import expected_signatures, layer_signature, pack, tail

__all__ = ["SyncBatchNormFunction", "SyncSpec", "reads_totals_on_host", "sync_batch_norm"]

ONE_VALUE_MESSAGE = (
    "SyncBatchNorm expected more than 1 value per channel across the process group when "
    "training (got {count}); use a larger batch, sync over more ranks, or call .eval()"
)
MIXED_LAYERS_MESSAGE = (
    "SyncBatchNorm layer {name!r} expected every rank of its group in this layer (got another "
    "rank at a different SyncBatchNorm layer, or at this one with another number of channels, "
    "whose statistics would have been mixed into this one's). Ranks must run SyncBN layers in "
    "the same order and the same number of times; rerun with SYNCBN_DEBUG=1 to see each "
    "rank's layer. Layers built "
    "outside convert_sync_batchnorm are named SyncBatchNorm#k in construction order per "
    "process: if ranks built different numbers of them, name them by their path in the model "
    "with syncbn.convert_sync_batchnorm(model)"
)


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


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalization over the global batch of ``group`` (the math: module docstring).

    ``forward(input, weight, bias, running_mean, running_var, momentum, eps, spec)`` returns
    ``(output, mean, invstd, count)``: the output,
    the global per-channel mean and :math:`1/\\sqrt{\\sigma^2 + \\epsilon}` (float32, or float64
    for float64 input) and the global count of values per channel (float64, 0-dim). It updates
    ``running_mean`` and ``running_var`` in place when they are given, with weight ``momentum``
    (a float, or a 0-dim tensor such as ``1 / num_batches_tracked``). ``spec`` is the layer's
    :class:`SyncSpec`.
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
        if spec.replay is not None:  # syncbn.recompute: checkpoint's rerun, no collective
            return _replay_forward(ctx, input, weight, bias, eps, spec)
        with _autocast_off(input.device.type):
            kernels = sbkernels.kernels_for(input)
            if getattr(kernels, "owns_per_channel_steps", False):
                return _forward_in_kernels(
                    ctx, kernels, input, weight, bias, running_mean, running_var,
                    momentum, eps, spec, num_batches_tracked,
                )  # fmt: skip
            if num_batches_tracked is not None:
                momentum = advance_num_batches(
                    num_batches_tracked, momentum, input, running_mean.dtype
                )
            fused = kernels is not sbkernels.PORTABLE
            x = _dense(input) if fused else input
            channels = x.shape[1]
            local_count = x.numel() // channels
            on_host = reads_totals_on_host(x)
            dtype = stat_dtype(x)

            # This rank's moments, then (C,), (C,), (2,) -> (2C+2,): the forward's one collective.
            if local_count > 0:
                mean, var = kernels.local_moments(x)
            else:  # zeros *from* x: under torch.compile a constant collective input may move
                mean = var = x.sum(reduce_dims(x), dtype=dtype)
            end = tail(spec.signature, x.device)
            buffer = kernels.step(pack)(mean, var, local_count, running_mean, end)
            if spec.debug and not torch.compiler.is_compiling():
                sbdebug.check_same_call(
                    spec.layer_name, channels, x.dtype, "forward", spec.group, x.device
                )
            buffer = _reduce(buffer, spec.group, spec.layer_name, "forward")

            if spec.check_finite and not torch.compiler.is_compiling():  # before any update
                q, p = buffer[: 2 * channels].view(2, channels)
                sbdebug.check_finite_statistics(spec.layer_name, p, q, x)
            maybe_empty = local_count == 0  # then the whole group may be empty too
            if on_host:
                count = _check_totals_on_host(buffer, channels, spec)
                mean, invstd = _global_statistics(
                    buffer, running_mean, running_var, momentum, eps, maybe_empty, count, dtype
                )
            else:
                if isinstance(momentum, Tensor):  # 0-dim inputs cost compiled steps a host read
                    momentum = momentum.view(1)
                mean, invstd, count, same_layer = kernels.step(_global_statistics_on_device)(
                    buffer,
                    running_mean,
                    running_var,
                    momentum,
                    eps,
                    maybe_empty,
                    dtype,
                    expected_signatures(spec.signature, spec.world_size, x.device),
                )
                _assert_on_device(same_layer, count, local_count)

            if local_count > 0:
                output = kernels.normalize(x, weight, bias, mean, invstd, eps)
            else:
                output = _empty_result(x, invstd)

        ctx.set_materialize_grads(False)  # mean, invstd, count get no gradient
        ctx.kernels = kernels
        ctx.spec = spec
        if on_host:
            ctx.count = count
            ctx.save_for_backward(x, weight, mean, invstd)
        else:
            ctx.count = None
            ctx.save_for_backward(x, weight, mean, invstd, count)
        total = buffer[2 * channels]
        ctx.mark_non_differentiable(mean, invstd, total)
        return output, mean, invstd, total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_invstd, _grad_count):
        if getattr(ctx.kernels, "owns_per_channel_steps", False):
            return _backward_in_kernels(ctx, grad_output)
        x, weight, mean, invstd, *device_count = ctx.saved_tensors
        count = ctx.count if ctx.count is not None else device_count[0]
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        kernels = ctx.kernels
        if grad_output is None:  # never in practice: only the output is differentiable
            grad_output = torch.zeros_like(x)
        with _autocast_off(x.device.type):
            dy = grad_output
            if kernels is not sbkernels.PORTABLE:
                dy = _dense(dy, like=x)
            if dy.dtype != x.dtype:
                dy = dy.to(x.dtype)

            if x.numel() > 0:
                sum_dy, sum_dy_xmu, grad_weight, grad_bias = kernels.backward_sums(
                    dy, x, mean, invstd, weight, need_weight
                )
            else:  # zero gradients (not None: DDP waits for every parameter's gradient)
                sum_dy = sum_dy_xmu = grad_weight = _empty_sum(dy, mean.dtype)
                grad_bias = grad_weight.clone()  # not the same tensor as the weight's

            # (C,), (C,) -> (2C,): the backward's one collective. Every rank runs it whenever
            # the layer's backward runs, even one that needs no input gradient (an empty input
            # made without grad on one rank, next to inputs with grad on the others): a rank
            # that skipped it would leave the others waiting.
            spec = ctx.spec
            if spec.debug and not torch.compiler.is_compiling():
                sbdebug.check_same_call(
                    spec.layer_name,
                    sum_dy.numel(),
                    sum_dy.dtype,
                    "backward",
                    spec.group,
                    sum_dy.device,
                )
            shares = kernels.step(_shares_of_means)(sum_dy, sum_dy_xmu, count, x.numel() == 0)
            means = _reduce(shares, spec.group, spec.layer_name, "backward").view(2, -1)
            grad_input = None
            if need_input and x.numel() > 0:
                grad_input = kernels.grad_input(dy, x, mean, invstd, weight, means)
            elif need_input:
                grad_input = _empty_result(x, means[0])

            grad_weight = _as(grad_weight, weight) if need_weight else None
            grad_bias = _as(grad_bias, weight) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _replay_forward(ctx, input, weight, bias, eps: float, spec: SyncSpec):
    """:meth:`SyncBatchNormFunction.forward` with the global statistics of an earlier forward
    (``spec.replay``, :mod:`syncbn.recompute`): no reduction, no running-statistics update; the
    saved tensors are the forward's, so the backward (and its all-reduce) is the same."""
    mean, invstd, total = spec.replay
    with _autocast_off(input.device.type):
        kernels = sbkernels.kernels_for(input)
        if getattr(kernels, "owns_per_channel_steps", False):
            return _replay_in_kernels(ctx, kernels, input, weight, bias, eps, spec)
        x = _dense(input) if kernels is not sbkernels.PORTABLE else input
        if x.numel() > 0:
            output = kernels.normalize(x, weight, bias, mean, invstd, eps)
        else:
            output = _empty_result(x, invstd)
    ctx.set_materialize_grads(False)
    ctx.kernels = kernels
    ctx.spec = spec
    if reads_totals_on_host(x):
        ctx.count = float(total)
        ctx.save_for_backward(x, weight, mean, invstd)
    else:
        ctx.count = None
        ctx.save_for_backward(x, weight, mean, invstd, total.view(1))
    mean, invstd, total = mean.clone(), invstd.clone(), total.clone()
    ctx.mark_non_differentiable(mean, invstd, total)
    return output, mean, invstd, total


def _replay_in_kernels(ctx, kernels, x, weight, bias, eps: float, spec: SyncSpec):
    """:func:`_replay_forward` with a kernel set that owns the per-channel steps: its normalize
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


def fuses_activation(input: Tensor) -> bool:
    """Whether the synchronized forward of ``input`` can apply an activation in its kernels
    (the Triton set: :attr:`SyncSpec.activation`); else the caller applies it."""
    return getattr(sbkernels.kernels_for(input), "owns_per_channel_steps", False)


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


def advance_num_batches(
    num_batches_tracked: Tensor, momentum: float | None, x: Tensor, dtype: torch.dtype
) -> float | Tensor:
    """Advance ``num_batches_tracked``; return this batch's running-average weight.

    ``momentum=None`` gives ``1 / num_batches_tracked``: a Python float where the host reads it
    for free (CPU), a device tensor elsewhere, where ``nn.BatchNorm`` calls ``float()`` on it (a
    host sync on CUDA). (The Triton kernels do both inside their launches.)
    """
    num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    if reads_totals_on_host(x):
        return 1.0 / float(num_batches_tracked)
    return num_batches_tracked.to(dtype).reciprocal_()


def reads_totals_on_host(x: Tensor) -> bool:
    """Whether the forward of ``x`` reads the reduced count on the host: on CPU in eager mode,
    where that is free. On CUDA and under ``torch.compile`` every total stays on the device."""
    return (
        not x.is_cuda
        and sbkernels.kernels_for(x) is sbkernels.PORTABLE
        and not torch.compiler.is_compiling()
    )


def _reduce(packed: Tensor, group, layer_name: str, phase: str) -> Tensor:
    """all_reduce_sum, with a failure (a peer died, the group timed out) naming the layer."""
    if torch.compiler.is_compiling():
        return all_reduce_sum(packed, group)
    try:
        return all_reduce_sum(packed, group)
    except RuntimeError as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(
            f"SyncBatchNorm layer {layer_name!r}: the {phase} all_reduce of {packed.numel()} "
            f"values failed ({cause}). A peer rank probably crashed or timed out, or the ranks "
            f"ran SyncBN layers a different number of times; rerun with SYNCBN_DEBUG=1 to find "
            f"the first divergent layer"
        ) from error


# ------------------------------------------------------- kernel sets that own the whole step


def _forward_in_kernels(
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
    buffer = _reduce(buffer, spec.group, spec.layer_name, "forward")
    if spec.check_finite:  # before any update
        q, p = buffer[: 2 * channels].view(2, channels)
        sbdebug.check_finite_statistics(spec.layer_name, p, q, x)
    output, mean, invstd = kernels.normalize_with_global_statistics(
        x, buffer, shift, weight, bias, running_mean, running_var, batches, momentum, eps,
        spec.world_size * spec.signature, spec.signature, spec.activation,
    )  # fmt: skip
    if not x.is_cuda:  # a host read is free: fail here, as the CPU path does
        sbkernels.raise_device_errors(x.device)
    ctx.set_materialize_grads(False)
    ctx.kernels = kernels
    ctx.spec = spec
    ctx.save_for_backward(x, weight, bias, mean, invstd, buffer)
    total = buffer[2 * channels]
    mean = mean[0]  # (2, C): the float32 mean and its remainder, kept for backward
    ctx.mark_non_differentiable(mean, invstd, total)
    return output, mean, invstd, total


def _backward_in_kernels(ctx, grad_output):
    """The backward with such a set: local sums -> all-reduce of the shares -> input gradient;
    the parameter gradients are this rank's sums (DDP averages them)."""
    x, weight, bias, mean, invstd, buffer = ctx.saved_tensors  # bias: for an activation's input
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    kernels, spec = ctx.kernels, ctx.spec
    dy = grad_output if grad_output is not None else torch.zeros_like(x)
    with _autocast_off(x.device.type):
        if not kernels.covers(dy):  # a gradient whose layout the kernels cannot address
            dy = _dense(dy, like=x)
        shares, grad_weight, grad_bias = kernels.backward_shares(
            dy, x, mean, invstd, buffer, weight,
            need_weight and weight is not None, need_bias and bias is not None,
            bias, spec.activation,
        )  # fmt: skip
        if spec.debug and not torch.compiler.is_compiling():
            sbdebug.check_same_call(
                spec.layer_name, x.shape[1], shares.dtype, "backward", spec.group, x.device
            )
        means = _reduce(shares, spec.group, spec.layer_name, "backward")
        grad_input = None
        if need_input:
            grad_input = kernels.grad_input(
                dy, x, mean, invstd, weight, means, bias, spec.activation
            )
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


# --------------------------------------------------------------------------- forward helpers


def _check_totals_on_host(buffer: Tensor, channels: int, spec: SyncSpec) -> float:
    """Check the reduced count and signatures on the host; return the count.

    A global count of exactly one value per channel has no variance (``nn.BatchNorm`` raises);
    zero is an empty global batch, which is allowed. A signature total other than
    :math:`W s` means some rank of the group was at another layer.
    """
    count, signatures = buffer[2 * channels :].tolist()
    if signatures != spec.world_size * spec.signature:
        raise RuntimeError(MIXED_LAYERS_MESSAGE.format(name=spec.layer_name))
    if count == 1:
        raise ValueError(ONE_VALUE_MESSAGE.format(count=1))
    return count


def _assert_on_device(same_layer: Tensor, count: Tensor, local_count: int) -> None:
    """The host path's two checks as device-side assertions (no host sync). Only a rank that
    holds at most one value can see a total of one, so the others skip that check."""
    torch._assert_async(same_layer, "SyncBatchNorm: ranks at different layers")
    if local_count <= 1:
        torch._assert_async(count != 1, ONE_VALUE_MESSAGE.format(count="1"))


def _global_statistics(
    buffer, running_mean, running_var, momentum, eps: float, maybe_empty: bool, count, dtype
) -> tuple[Tensor, Tensor]:
    r"""The group's mean and :math:`1/\sqrt{\sigma^2 + \epsilon}` in ``dtype`` (the
    statistics' dtype) from the reduced buffer (consumed); updates the running statistics.

    ``count`` is :math:`n`: a float on the host path, the buffer's 0-dim entry otherwise.
    """
    channels = (buffer.numel() - 2) // 2
    stats = _merge(buffer, channels, count, maybe_empty).to(dtype)  # (2, C): [var; mean - K]
    var, mean = stats.unbind()
    if running_mean is not None:
        mean.add_(running_mean)  # undo the shift
        _update_running_stats(running_mean, running_var, mean, var, count, momentum, maybe_empty)
    return mean, var.add_(eps).rsqrt_()


def _global_statistics_on_device(
    buffer, running_mean, running_var, momentum, eps, maybe_empty, dtype, expected
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_global_statistics` without a host read, plus the count and whether every rank of
    the group sent this layer's signature (their sum is ``expected``,
    :func:`~syncbn.moments.expected_signatures`): one generated kernel when compiled.

    The count, the flag and a tensor ``momentum`` have shape ``(1,)``, not ``()``: a compiled
    step's guards read 0-dim tensor inputs on the host (a sync on CUDA)."""
    channels = (buffer.numel() - 2) // 2
    count, signatures = buffer[2 * channels :].split(1)
    same_layer = signatures == expected
    if isinstance(momentum, Tensor):
        momentum = momentum[0]
    mean, invstd = _global_statistics(
        buffer, running_mean, running_var, momentum, eps, maybe_empty, count[0], dtype
    )
    return mean, invstd, count, same_layer


def _shares_of_means(sum_dy: Tensor, sum_dy_xmu: Tensor, count, empty: bool) -> Tensor:
    r"""(C,), (C,) -> (2C,): this rank's local sums over the group's :math:`n`, so that the
    backward's all-reduce yields the group's means :math:`[\frac1n \sum g;\ \frac1n \sum g
    (x - \mu)]` directly (:math:`\sum g \hat x` in place of :math:`\sum g (x - \mu)` with the
    portable kernels). On an empty rank the group may be empty too (:math:`n = 0`): the division
    takes :math:`\max(n, 1)` there, which leaves zeros."""
    shares = torch.cat([sum_dy, sum_dy_xmu])
    if isinstance(count, float):
        return shares.div_(max(count, 1.0))
    return shares.div_(count.clamp_min(1) if empty else count)


def _merge(buffer: Tensor, channels: int, count, maybe_empty: bool) -> Tensor:
    r"""The group's ``(2, C)`` :math:`[\sigma^2;\ \mu - K]` in float64, from the reduced
    :math:`[Q | P | n | \sum s]` (consumed in place): :math:`\mu - K = P/n` and
    :math:`\sigma^2 = Q/n - (P/n)^2`, the one cancellation, which is why it runs in float64.

    ``count`` is :math:`n`: a float on the host path, a 0-dim tensor otherwise. When this rank
    is empty the group may be too (:math:`n = 0`): the division then takes :math:`\max(n, 1)`,
    which leaves zeros (one more op, on empty ranks only).
    """
    rows = buffer[: 2 * channels].view(2, channels)  # [Q; P]
    if isinstance(count, float):
        rows.div_(max(count, 1.0))
    else:
        rows.div_(count.clamp_min(1) if maybe_empty else count)
    var, centred_mean = rows.unbind()
    var.addcmul_(centred_mean, centred_mean, value=-1).clamp_min_(0)
    return rows


def _update_running_stats(running_mean, running_var, mean, var, count, momentum, maybe_empty):
    r"""``running <- running + m (observed - running)`` for the mean and the unbiased variance
    :math:`\sigma^2 n / (n - 1)`, both in one multi-tensor ``lerp``; untouched when :math:`n = 0`
    (there ``mean`` is the running mean itself and ``var`` is 0, and the weight is 0)."""
    if isinstance(count, float):  # host path: the count is known
        if count < 2:
            return
        unbiased = var * (count / (count - 1))
    else:
        unbiased = var * (count / (count - 1))  # n = 0 gives -0, not NaN: var is 0 there
        if maybe_empty:
            momentum = (count > 0).to(running_mean.dtype) * momentum
    if mean.dtype == running_mean.dtype:
        # A tensor weight must go in a list: as a lone argument it becomes a Scalar via .item().
        weight = [momentum, momentum] if isinstance(momentum, Tensor) else momentum
        torch._foreach_lerp_([running_mean, running_var], [mean, unbiased], weight)
    else:  # parameters in half precision: the statistics stay float32 until here
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def _autocast_off(device_type: str):
    """Autocast disabled inside the layer (it manages its own dtypes); entering ``autocast``
    costs more than the small ops here, so only when it is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _dense(t: Tensor, like: Tensor | None = None) -> Tensor:
    """Dense in ``like``'s (default: its own) memory format, as the CUDA kernels need."""
    return t.contiguous(memory_format=memory_format(like if like is not None else t))


def _empty_result(x: Tensor, reduced: Tensor) -> Tensor:
    """An empty rank's (empty) output or input gradient, made *from* a reduced statistic.

    Numerically it is just ``empty_like(x)``; the data dependence matters under torch.compile.
    AOTAutograd computes each collective as soon as its inputs exist, so if an empty rank's
    results were created from nothing, the *previous* layer's backward collective would be fed
    by constants and move into the forward graph of that rank only: the ranks' collectives would
    no longer pair up (a gloo size mismatch, or a hang). An expanded view of a (C,) statistic is
    a dependence no compiler pass folds away (``stat * 0`` is folded to a constant).
    """
    expanded = channel_view(reduced.to(x.dtype), x).expand(x.shape)
    return expanded.clone(memory_format=memory_format(x))


def _empty_sum(dy: Tensor, dtype: torch.dtype) -> Tensor:
    """An empty rank's ``sum dy`` (and ``sum dy (x - mean)``): zeros, computed from ``dy``.

    The dependence on the upstream gradient keeps a compiled graph's backward collective in the
    backward pass: zeros made from nothing let the partitioner move it into the forward graph of
    this rank only, and the ranks' collectives would no longer pair up.
    """
    return dy.sum(reduce_dims(dy), dtype=dtype)


def _as(grad: Tensor | None, weight: Tensor | None) -> Tensor | None:
    """A parameter gradient in the parameter's dtype (``None`` without a parameter)."""
    if grad is None or weight is None:
        return None
    return grad if grad.dtype == weight.dtype else grad.to(weight.dtype)
