r"""Autograd function of synchronized batch normalization: one all-reduce forward, one backward.

Forward, for input :math:`x` of shape :math:`(N, C, *)` on rank :math:`r` of a group of :math:`W`
ranks, per channel :math:`c`:

.. math::

    n_r = N \prod *, \qquad
    \mu_r = \frac{1}{n_r} \sum_{i} x_{i}, \qquad
    M_r = \sum_{i} (x_{i} - \mu_r)^2

    \text{all\_reduce}\big([\, n_r \mu_r,\; M_r + n_r \mu_r^2,\; n_r \,]\big)
        = [\, S_1,\; S_2,\; n \,] \qquad \text{(one buffer of } 2C + 1 \text{ values)}

    \mu = \frac{S_1}{n}, \qquad \sigma^2 = \frac{S_2}{n} - \mu^2, \qquad
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

Backward, with :math:`\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}` and
:math:`g = \partial L / \partial y`:

.. math::

    \text{all\_reduce}\big([\, \textstyle\sum g,\; \sum g \hat x \,]\big) \qquad (2C \text{ values})

    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
        \Big( g - \frac{1}{n}\sum g - \hat x \, \frac{1}{n} \sum g \hat x \Big)

while :math:`\partial L/\partial \gamma = \sum g \hat x` and
:math:`\partial L/\partial \beta = \sum g` stay local (this rank's share): DDP averages
parameter gradients, so reducing them here as well would count them :math:`W` times.

Numerics. The naive one-pass moments :math:`\sum x, \sum x^2` in float32 lose every digit of the
variance once :math:`|\mu| \gg \sigma` (at :math:`|\mu| = 10^4\sigma` they return garbage, even a
negative variance). Each rank therefore first computes *centred* local moments
:math:`(\mu_r, M_r)` in the input's accumulation dtype (two passes on CPU; Welford in
``torch.batch_norm_stats`` on CUDA), and only the cheap :math:`2C + 1` merge runs in float64, where
the cancellation in :math:`S_2/n - \mu^2` costs about :math:`\log_{10}(\mu^2/\sigma^2)` of float64's
16 digits: :math:`10^{-8}` relative at :math:`|\mu| = 10^4\sigma`. Counts travel in float64 too,
which is exact below :math:`2^{53}` (a float16 count overflows past 65504).

No device-to-host synchronization: empty ranks are handled by shape (known on the host), zero
counts by arithmetic on device, and the "more than one value per channel" check runs on the host
only on CPU, where it is free; on CUDA it is a device-side ``torch._assert_async``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from . import debug as sbdebug
from .distributed import all_reduce_sum

__all__ = ["SyncBatchNormFunction", "sync_batch_norm"]

_ONE_VALUE_MESSAGE = (
    "SyncBatchNorm expected more than 1 value per channel across the process group when "
    "training (got {count}); use a larger batch, sync over more ranks, or call .eval()"
)


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalization over the global batch of ``group`` (the math: module docstring).

    ``forward(input, weight, bias, eps, group, layer_name, debug, check_finite)`` returns
    ``(output, mean, var, count)``: the output and the global per-channel mean, *biased* variance
    and element count (float64, 0-dim). The statistics are not differentiable; the caller uses
    them to update running buffers. ``layer_name`` names the layer in errors; ``debug`` and
    ``check_finite`` switch on the checks of :mod:`syncbn.debug`.
    """

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        group: ProcessGroup | None,
        layer_name: str = "SyncBatchNorm",
        debug: bool = False,
        check_finite: bool = False,
    ):
        with torch.autocast(device_type=input.device.type, enabled=False):
            x = _contiguous(input) if input.is_cuda else input
            num_channels = x.shape[1]

            # Local centred moments, then one all-reduce of (C,), (C,), (1,) -> (2C+1,) in float64.
            count, mean, m2 = _local_moments(x)
            packed = torch.cat([mean * count, m2 + count * mean * mean, count.view(1)])
            if debug and not torch.compiler.is_compiling():
                sbdebug.check_same_call(
                    layer_name, num_channels, x.dtype, "forward", group, x.device
                )
            packed = _reduce(packed, group, layer_name, "forward")
            sum_x, sum_x2, total = packed.split([num_channels, num_channels, 1])
            total = total.view(())
            _check_more_than_one_value(total, x)

            mean64 = sum_x / total
            var64 = (sum_x2 / total - mean64 * mean64).clamp_min_(0.0)
            stat_dtype = _stat_dtype(x)
            mean, var = mean64.to(stat_dtype), var64.to(stat_dtype)
            if check_finite and not torch.compiler.is_compiling():
                sbdebug.check_finite_statistics(layer_name, mean64, var64, x)
            invstd = torch.rsqrt(var + eps)

            output = _normalize(x, weight, bias, mean, var, invstd, eps)

        ctx.eps = eps
        ctx.group = group
        ctx.layer_name = layer_name
        ctx.debug = debug
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.mark_non_differentiable(mean, var, total)
        return output, mean, var, total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_mean, _grad_var, _grad_count):
        x, weight, mean, invstd, total = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        with torch.autocast(device_type=x.device.type, enabled=False):
            dy = grad_output
            if x.is_cuda:
                dy = dy.contiguous(memory_format=_memory_format(x))
            if dy.dtype != x.dtype:
                dy = dy.to(x.dtype)
            if x.is_cuda and x.numel() > 0:
                return _backward_cuda(ctx, dy, x, weight, mean, invstd, total)

            # Portable path (CPU, or an empty rank anywhere): one fused reduction pass for
            # sum(dy) and sum(dy * x_hat); native_batch_norm_backward crashes on empty input.
            if x.numel() > 0:
                _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                    dy, x, None, None, None, mean, invstd, True, ctx.eps, [False, True, True]
                )
            else:
                sum_dy, sum_dy_xhat = _empty_sums(dy, mean.dtype)

            grad_input = None
            if need_input:
                # (C,), (C,) -> (2C,): the only collective of the backward pass.
                sum_dy_g, sum_dy_xhat_g = _all_reduce_pair(sum_dy, sum_dy_xhat, ctx)
                grad_input = _input_grad(
                    dy, x, weight, mean, invstd, total, sum_dy_g, sum_dy_xhat_g
                )
            grad_weight = sum_dy_xhat.to(weight.dtype) if need_weight else None
            grad_bias = sum_dy.to(weight.dtype) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def sync_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    group: ProcessGroup | None,
    layer_name: str = "SyncBatchNorm",
    debug: bool = False,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional form of :class:`SyncBatchNormFunction`: ``(output, mean, biased var, count)``."""
    return SyncBatchNormFunction.apply(
        input, weight, bias, eps, group, layer_name, debug, check_finite
    )


def _reduce(packed: torch.Tensor, group, layer_name: str, phase: str) -> torch.Tensor:
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


# --------------------------------------------------------------------------- forward helpers


def _empty_result(x: torch.Tensor, reduced: torch.Tensor) -> torch.Tensor:
    """An empty rank's (empty) output or input gradient, made *from* a reduced statistic.

    Numerically it is just ``empty_like(x)``; the data dependence matters under torch.compile.
    AOTAutograd computes each collective as soon as its inputs exist, so if an empty rank's
    results were created from nothing, the *previous* layer's backward collective would be fed
    by constants and move into the forward graph of that rank only: the ranks' collectives would
    no longer pair up (a gloo size mismatch, or a hang). An expanded view of a (C,) statistic is
    a dependence no compiler pass folds away (``stat * 0`` is folded to a constant).
    """
    return _channel_view(reduced.to(x.dtype), x).expand(x.shape).clone()


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics accumulate in float32, or float64 for float64 input (never in half precision)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    """Dense in its own memory format (channels_last stays so), as the CUDA kernels need."""
    return x.contiguous(memory_format=_memory_format(x))


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(C,) -> (C, 1, ..., 1), broadcastable against x of shape (N, C, *)."""
    return t.view((-1,) + (1,) * (x.dim() - 2))


def _local_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's per-channel (count, mean, centred sum of squares), all float64 on x's device.

    CPU: ``sum``, then the square of the centred input, in place: two passes over memory and
    several times faster than ``torch.var_mean`` here (see scripts/bench_layer.py). CUDA: Welford
    in ``torch.batch_norm_stats``, asked for ``eps=0`` so the variance comes back exact.
    An empty rank contributes zeros.
    """
    num_channels = x.shape[1]
    n = x.numel() // num_channels if num_channels else 0
    count = torch.full((), float(n), dtype=torch.float64, device=x.device)
    reduce_dims = [0] + list(range(2, x.dim()))
    if n == 0:
        # Zeros computed *from* x, not created from nothing: under torch.compile a collective
        # whose input is a constant may be moved or folded, and ranks would then disagree.
        zeros = x.sum(reduce_dims, dtype=torch.float64)
        return count, zeros, zeros
    if x.is_cuda:
        mean, invstd = torch.batch_norm_stats(x, 0.0)
        var = torch.reciprocal(invstd * invstd)  # invstd = inf for a constant channel -> var 0
        mean64 = mean.double()
        return count, mean64, var.double() * n
    mean = x.sum(reduce_dims, dtype=_stat_dtype(x)) / n
    centred = x - _channel_view(mean, x)  # promotes half inputs to float32
    m2 = centred.square_().sum(reduce_dims)
    return count, mean.double(), m2.double()


def _check_more_than_one_value(total: torch.Tensor, x: torch.Tensor) -> None:
    """Training needs more than one value per channel globally (one per rank is fine)."""
    if x.is_cuda or torch.compiler.is_compiling():
        # No host sync: a device-side assertion (fatal to the CUDA context, as any device assert).
        torch._assert_async(total > 1, _ONE_VALUE_MESSAGE.format(count="1 or fewer"))
    elif total.item() <= 1:
        raise ValueError(_ONE_VALUE_MESSAGE.format(count=int(total.item())))


def _normalize(x, weight, bias, mean, var, invstd, eps):
    """y = (x - mean) * invstd * weight + bias with global statistics, in x's dtype and layout."""
    if x.numel() == 0:
        return _empty_result(x, invstd)
    if x.is_cuda:
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    # The eval-mode CPU kernel is exactly a fused per-channel affine with given mean and var.
    # With a parameter dtype other than float32 (e.g. a model cast to bfloat16), pass the
    # statistics in that dtype: the CPU kernel requires matching parameter dtypes.
    param_dtype = weight.dtype if weight is not None else mean.dtype
    return torch.batch_norm(
        x, weight, bias, mean.to(param_dtype), var.to(param_dtype), False, 0.0, eps, False
    )


# --------------------------------------------------------------------------- backward helpers


def _all_reduce_pair(a: torch.Tensor, b: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum two (C,) tensors over the group with a single collective."""
    if ctx.debug and not torch.compiler.is_compiling():
        sbdebug.check_same_call(ctx.layer_name, a.numel(), a.dtype, "backward", ctx.group, a.device)
    packed = _reduce(torch.cat([a, b]), ctx.group, ctx.layer_name, "backward")
    return packed.split([a.numel(), b.numel()])


def _empty_sums(dy: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty rank's (sum dy, sum dy * x_hat): zeros, but computed from ``dy``.

    The dependence on the upstream gradient keeps a compiled graph's backward collective in the
    backward pass: zeros made from nothing let the partitioner move it into the forward graph of
    this rank only, and the ranks' collectives would no longer pair up.
    """
    reduce_dims = [0] + list(range(2, dy.dim()))
    sum_dy = dy.sum(reduce_dims, dtype=dtype)
    return sum_dy, sum_dy.clone()


def _input_grad(dy, x, weight, mean, invstd, total, sum_dy, sum_dy_xhat):
    r"""dx = a * dy + b * (x - mean) + c, the backward formula in per-channel coefficients.

    With :math:`a = \gamma\,\mathrm{invstd}`, :math:`b = -a\,\mathrm{invstd}\,\overline{g\hat x}`
    and :math:`c = -a\,\bar g`. The eval-mode batch_norm kernel computes ``b * (x - mean) + c``
    in one fused pass (twice as fast as ``addcmul`` with a broadcast operand on CPU here), then
    ``addcmul_`` adds ``a * dy``: two passes over memory in all.
    """
    if x.numel() == 0:
        return _empty_result(x, sum_dy)
    n = total.to(mean.dtype)
    a = invstd if weight is None else weight.to(mean.dtype) * invstd
    b = -a * invstd * (sum_dy_xhat / n)
    c = -a * (sum_dy / n)
    work_dtype = mean.dtype
    ones = torch.ones_like(mean)
    grad_input = torch.batch_norm(
        x.to(work_dtype), b, c, mean, ones, False, 0.0, 0.0, False
    )  # (x - mean) / sqrt(1 + 0) * b + c
    grad_input.addcmul_(dy, _channel_view(a, x))
    return grad_input.to(x.dtype)


def _backward_cuda(ctx, dy, x, weight, mean, invstd, total):
    """CUDA path: PyTorch's fused batch_norm_backward_reduce / _elemt kernels, no host sync."""
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
        dy, x, mean, invstd, weight, need_input, need_weight, need_bias
    )
    grad_input = None
    if need_input:
        sum_dy, sum_dy_xmu = _all_reduce_pair(sum_dy, sum_dy_xmu, ctx)
        # The kernel divides by count.sum(); an int32 (1,) tensor on device keeps it sync-free.
        count = total.to(torch.int32).view(1)
        grad_input = torch.batch_norm_backward_elemt(
            dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count
        )
    return grad_input, grad_weight, grad_bias, None, None, None, None, None
