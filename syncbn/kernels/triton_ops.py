"""The Triton kernel set as ``torch.library`` custom ops, for ``torch.compile``.

Under ``torch.compile`` the layer uses the portable ops by default, which inductor fuses.
``SYNCBN_COMPILE_KERNELS=triton`` makes a compiled graph call the Triton kernels instead: each
of :class:`~syncbn.kernels.triton_set.TritonKernels`' four launches becomes one opaque custom op
(with a fake implementation that gives inductor the output shapes, and the running statistics and
``num_batches_tracked`` declared as mutated), so the graph keeps the four launches and the two
all-reduces (functional collectives) and inductor fuses what lies around them. Which of the two
is faster under compile is a question for a GPU (``COMPILE_MODEL=1 bash scripts/gpu_check.sh``
times both); the default stays the portable ops until it is measured.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_set import TritonKernels

__all__ = ["CompiledTritonKernels"]

_SET = TritonKernels()


def _activation(name: str, slope: float) -> tuple[str, float] | None:
    return (name, slope) if name else None


@torch.library.custom_op("syncbn::triton_moments", mutates_args=("num_batches_tracked",))
def _moments(
    x: Tensor,
    running_mean: Tensor | None,
    num_batches_tracked: Tensor | None,
    signature: int,
    layer_name: str,
) -> tuple[Tensor, Tensor]:
    return _SET.pack_moments(x, running_mean, num_batches_tracked, signature, layer_name)


@_moments.register_fake
def _(x, running_mean, num_batches_tracked, signature, layer_name):
    c = x.shape[1]
    return x.new_empty(2 * c + 2, dtype=torch.float64), x.new_empty(c, dtype=torch.float64)


@torch.library.custom_op("syncbn::triton_normalize", mutates_args=("running_mean", "running_var"))
def _normalize(
    x: Tensor,
    buffer: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    expected_signatures: int,
    signature: int,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _SET.normalize_with_global_statistics(
        x, buffer, shift, weight, bias, running_mean, running_var, num_batches_tracked,
        momentum, eps, expected_signatures, signature, _activation(activation, negative_slope),
    )  # fmt: skip


@_normalize.register_fake
def _(x, buffer, shift, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
      eps, expected_signatures, signature, activation, negative_slope):  # fmt: skip
    c = x.shape[1]
    mean = x.new_empty((2, c), dtype=torch.float32)
    return torch.empty_like(x), mean, x.new_empty(c, dtype=torch.float32)


@torch.library.custom_op("syncbn::triton_backward_shares", mutates_args=())
def _backward_shares(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    buffer: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    need_weight: bool,
    need_bias: bool,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    shares, grad_weight, grad_bias = _SET.backward_shares(
        dy, x, mean, invstd, buffer, weight, need_weight, need_bias, bias,
        _activation(activation, negative_slope),
    )  # fmt: skip
    # A custom op returns tensors: an empty one where no gradient was asked for.
    empty = shares.new_empty(0)
    return (
        shares,
        grad_weight if grad_weight is not None else empty,
        (grad_bias if grad_bias is not None else empty),
    )


@_backward_shares.register_fake
def _(dy, x, mean, invstd, buffer, weight, bias, need_weight, need_bias, activation,
      negative_slope):  # fmt: skip
    c = x.shape[1]
    dtype = weight.dtype if weight is not None else torch.float32
    return (
        x.new_empty(2 * c, dtype=torch.float32),
        x.new_empty(c if need_weight else 0, dtype=dtype if need_weight else torch.float32),
        x.new_empty(c if need_bias else 0, dtype=dtype if need_bias else torch.float32),
    )


@torch.library.custom_op("syncbn::triton_grad_input", mutates_args=())
def _grad_input(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    means: Tensor,
    bias: Tensor | None,
    activation: str,
    negative_slope: float,
) -> Tensor:
    return _SET.grad_input(
        dy, x, mean, invstd, weight, means, bias, _activation(activation, negative_slope)
    )


@_grad_input.register_fake
def _(dy, x, mean, invstd, weight, means, bias, activation, negative_slope):
    return torch.empty_like(x)


def _name_and_slope(activation: tuple[str, float] | None) -> tuple[str, float]:
    return (activation[0], float(activation[1])) if activation else ("", 0.0)


class CompiledTritonKernels(TritonKernels):
    """:class:`TritonKernels` whose launches are the custom ops above: what a compiled graph
    calls with ``SYNCBN_COMPILE_KERNELS=triton`` (same contracts)."""

    name = "triton (custom ops)"

    def pack_moments(self, x, running_mean, num_batches_tracked, signature, layer_name):
        return _moments(x, running_mean, num_batches_tracked, signature, layer_name)

    def normalize_with_global_statistics(
        self, x, buffer, shift, weight, bias, running_mean, running_var, num_batches_tracked,
        momentum, eps, expected_signatures, signature, activation=None,
    ):  # fmt: skip
        return _normalize(
            x, buffer, shift, weight, bias, running_mean, running_var, num_batches_tracked,
            None if momentum is None else float(momentum), eps, expected_signatures, signature,
            *_name_and_slope(activation),
        )  # fmt: skip

    def backward_shares(
        self, dy, x, mean, invstd, buffer, weight, need_weight, need_bias, bias=None,
        activation=None,
    ):  # fmt: skip
        shares, grad_weight, grad_bias = _backward_shares(
            dy, x, mean, invstd, buffer, weight, bias, need_weight, need_bias,
            *_name_and_slope(activation),
        )  # fmt: skip
        return shares, grad_weight if need_weight else None, grad_bias if need_bias else None

    def grad_input(self, dy, x, mean, invstd, weight, means, bias=None, activation=None):
        return _grad_input(dy, x, mean, invstd, weight, means, bias, *_name_and_slope(activation))
