"""The portable kernel set: composite ATen ops, for CPU and for any device under torch.compile."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import _as_type, channel_view, reduce_dims, stat_dtype


class PortableKernels:
    """Composite ATen ops: CPU, and any device under ``torch.compile``.

    Contracts: statistics in :func:`stat_dtype`; ``weight`` may be ``None``; inputs non-empty.
    """

    name = "portable"

    @staticmethod
    def step(fn):
        """``fn`` as it is: op by op on CPU (where small ops are cheap), and traced into the
        caller's graph under ``torch.compile``."""
        return fn

    @staticmethod
    def local_moments(x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and biased variance, centred (two passes: exact at large means)."""
        dims = reduce_dims(x)
        mean = x.mean(dims, dtype=stat_dtype(x))
        centred = x - channel_view(mean, x)  # promotes half input to float32
        return mean, centred.square_().mean(dims)

    @staticmethod
    def normalize(x, weight, bias, mean, invstd, eps: float) -> Tensor:
        """``(x - mean) * invstd * weight + bias`` in x's dtype and memory format.

        The eval-mode CPU kernel with unit variance and ``eps = 0`` is exactly this fused
        per-channel affine, given the scale ``weight * invstd``. It wants its per-channel
        arguments in the parameters' dtype (a model cast to bfloat16 has bfloat16 parameters).
        """
        scale = invstd if weight is None else weight * invstd
        param_dtype = weight.dtype if weight is not None else mean.dtype
        scale, mean = _as_type(scale, param_dtype), _as_type(mean, param_dtype)
        return torch.batch_norm(x, scale, bias, mean, _ones(mean), False, 0.0, 0.0, False)

    @staticmethod
    def backward_sums(dy, x, mean, invstd, weight, need_weight: bool):
        r"""``(sum dy, sum dy x_hat, grad_weight, grad_bias)``, local, in one fused pass.

        ``native_batch_norm_backward`` given the global mean and invstd computes exactly
        :math:`\sum g \hat x` and :math:`\sum g` as its weight and bias gradients. (This set
        reduces :math:`\sum g \hat x`, the fused set :math:`\sum g (x - \mu)`: each set's
        ``grad_input`` reads its own; an empty rank sends zeros, which are both.)
        """
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, None, None, mean, invstd, True, 0.0, [False, True, True]
        )
        return sum_dy, sum_dy_xhat, sum_dy_xhat, sum_dy

    @staticmethod
    def grad_input(dy, x, mean, invstd, weight, means: Tensor) -> Tensor:
        r"""``dx = a dy + b (x - mean) + c`` with per-channel coefficients, in two passes.

        ``means`` is the group's ``(2, C)`` :math:`[\frac1n \sum g;\ \frac1n \sum g \hat x]`
        (consumed). With :math:`a = \gamma\,\mathrm{invstd}`,
        :math:`b = -a\,\mathrm{invstd} \sum g \hat x / n` and :math:`c = -a \sum g / n`, the
        eval-mode ``batch_norm`` kernel computes ``b (x - mean) + c`` in one fused pass (twice as
        fast as a broadcast ``addcmul`` on CPU), then ``addcmul_`` adds ``a dy``.
        """
        a = invstd if weight is None else _as_type(weight, invstd.dtype) * invstd
        coefficients = means.mul_(a).neg_()  # (2, C): [c; b / invstd]
        c, b = coefficients.unbind()
        b.mul_(invstd)
        work = _as_type(x, mean.dtype)
        grad = torch.batch_norm(work, b, c, mean, _ones(mean), False, 0.0, 0.0, False)
        grad.addcmul_(dy, channel_view(a, x))
        return _as_type(grad, x.dtype)


_ONES: dict[tuple, Tensor] = {}


def _ones(like: Tensor) -> Tensor:
    """A cached (C,) tensor of ones: a constant, so no per-step allocation."""
    if torch.compiler.is_compiling():
        return torch.ones_like(like)
    key = (like.numel(), like.dtype, like.device)
    ones = _ONES.get(key)
    if ones is None:
        if len(_ONES) > 256:
            _ONES.clear()
        ones = _ONES[key] = torch.ones_like(like)
    return ones
