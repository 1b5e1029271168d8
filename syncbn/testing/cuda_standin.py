r"""A CPU model of PyTorch's CUDA kernels for synchronized BN, for driving the CUDA branch on CPU.

CI has no GPU, so ``syncbn.kernels.FusedKernels(ops=cuda_standin)`` runs the CUDA branch of
:mod:`syncbn.function` on CPU ranks. Each function follows its kernel's contract as written in
``aten/src/ATen/native/cuda/Normalization.cu`` and ``Normalization.cuh`` (torch 2.x): which
implementation a layout dispatches to (contiguous, channels-last, general), the dtypes each one
accepts (and the errors it raises otherwise), the ``InvStd`` transform, what is returned for an
undefined weight, and the int32 counts. The arithmetic is done in float64 and rounded to the
kernel's output dtypes, so results match the real kernels to their rounding.

What this proves and what it does not: it catches the CUDA branch calling the kernels against
their contracts (the defects of issue 13 each fail here) and checks the branch's arithmetic and
device-side logic (no host reads, the device-side assertions) end to end on real gloo ranks. It
cannot prove the kernels themselves, their speed, CUDA graph capture or NCCL; the GPU tests do.

Each function runs under ``record_function("standin::<name>")`` so that op counts
(``scripts/bench/bench_layer.py --count-ops``) see one op per kernel call, as on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1


def _kernel(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(f"standin::{fn.__name__}"):
            return fn(*args, **kwargs)

    return wrapper


def _acc(dtype: torch.dtype) -> torch.dtype:
    """``at::acc_type<T, /*is_cuda=*/true>``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _view(t: Tensor, x: Tensor) -> Tensor:
    return t.view((-1,) + (1,) * (x.dim() - 2))


def _can_use_32bit_index_math(t: Tensor) -> bool:
    return t.numel() <= INT32_MAX


def _use_channels_last_kernels(t: Tensor) -> bool:
    """``batch_norm_use_channels_last_kernels``."""
    return t.is_contiguous(memory_format=torch.channels_last) or (
        t.is_contiguous() and t.stride(1) == 1
    )


def _choose_impl(t: Tensor) -> str:
    """``batch_norm_choose_impl``: contiguous, channels_last or general."""
    if not _can_use_32bit_index_math(t):
        return "general"
    if t.is_contiguous():
        return "channels_last" if t.stride(1) == 1 else "contiguous"
    if t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "general"


def _expect(t: Tensor | None, dtype: torch.dtype, name: str) -> None:
    """``get_packed_accessor`` / ``data_ptr<T>``: the tensor must have exactly this dtype."""
    if t is not None and t.dtype != dtype:
        raise RuntimeError(f"Expected {name} to have type {_c10(dtype)} but got {_c10(t.dtype)}")


def _c10(dtype: torch.dtype) -> str:
    return {
        torch.float16: "Half",
        torch.bfloat16: "BFloat16",
        torch.float32: "Float",
        torch.float64: "Double",
        torch.int32: "Int",
        torch.int64: "Long",
    }.get(dtype, str(dtype))


def _first_param_dtype(*params: Tensor | None) -> torch.dtype | None:
    for p in params:
        if p is not None:
            return p.dtype
    return None


def _welford(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance in float64."""
    x64 = x.double()
    var, mean = torch.var_mean(x64, _dims(x), correction=0)
    return mean, var


# --------------------------------------------------------------------------- statistics


@_kernel
def batch_norm_stats(input: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and ``InvStd``: ``1/sqrt(var + eps)``, but 0 when ``var == 0 and eps == 0``."""
    if input.numel() == 0:
        raise RuntimeError("batch_norm_stats: no defined result for empty input")
    acc = _acc(input.dtype)
    mean, var = _welford(input)
    invstd = torch.where((var == 0) & (eps == 0), torch.zeros_like(var), torch.rsqrt(var + eps))
    return mean.to(acc), invstd.to(acc)


@_kernel
def batch_norm_update_stats(input, running_mean, running_var, momentum):
    """Mean and *biased* variance (the ``Var`` transform) in the accumulation dtype; running
    statistics updated with the unbiased variance when given."""
    if input.numel() == 0:
        raise RuntimeError("batch_norm_update_stats: no defined result for empty input")
    acc = _acc(input.dtype)
    mean, var = _welford(input)
    if running_mean is not None:
        n = input.numel() // input.shape[1]
        with torch.no_grad():
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.double())
            running_var.copy_(momentum * var * n / (n - 1) + (1 - momentum) * running_var.double())
    return mean.to(acc), var.to(acc)


@_kernel
def batch_norm_gather_stats_with_counts(
    input, mean, invstd, running_mean, running_var, momentum, eps, counts
):
    """Merge per-rank ``(mean, invstd, count)`` rows as the kernel does, ``n`` in ``index_t``.

    The running count ``n`` is an ``index_t`` (int32 for inputs of fewer than 2^31 elements):
    ``n += count`` truncates each float count and wraps past 2^31, as on the GPU.
    """
    scalar = running_mean.dtype if running_mean is not None else input.dtype
    acc = _acc(scalar)
    _expect(mean, acc, "mean")
    _expect(invstd, acc, "invstd")
    _expect(counts, scalar, "counts")
    index_bits = 32 if _can_use_32bit_index_math(input) else 64
    avg = torch.zeros(mean.shape[1], dtype=torch.float64)
    var_n = torch.zeros_like(avg)
    n = 0
    for j in range(mean.shape[0]):
        count = float(counts[j])
        m = mean[j].double()
        v = (1.0 / invstd[j].double()) ** 2 - eps
        v = v * count
        factor = 1.0 / (n + count)
        var_n += v + (avg - m) ** 2 * n * count * factor
        avg = n * factor * avg + count * factor * m
        n = _wrap(n + int(count), index_bits)
    out_invstd = 1.0 / torch.sqrt(var_n / n + eps)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_((1 - momentum) * running_mean.double() + momentum * avg)
            running_var.copy_((1 - momentum) * running_var.double() + momentum * var_n / (n - 1))
    out = torch.float32 if mean.dtype in (torch.float16, torch.bfloat16) else mean.dtype
    return avg.to(out), out_invstd.to(out)


def _wrap(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


# --------------------------------------------------------------------------- elementwise


@_kernel
def batch_norm_elemt(input, weight, bias, mean, invstd, eps):
    """``(x - mean) * invstd * weight + bias`` under the dtype rules of each implementation."""
    acc = _acc(input.dtype)
    impl = _choose_impl(input)
    if impl == "contiguous":
        mixed = (_first_param_dtype(weight, bias) or input.dtype) != input.dtype
        stat_scalar = acc if mixed else input.dtype
        _expect(weight, stat_scalar, "weight")
        _expect(bias, stat_scalar, "bias")
        _expect(mean, _acc(stat_scalar), "mean")
        _expect(invstd, _acc(stat_scalar), "invstd")
    elif impl == "channels_last":
        second = _first_param_dtype(weight, bias) or input.dtype
        layer = acc if input.dtype != second else input.dtype
        _expect(weight, layer, "weight")
        _expect(bias, layer, "bias")
        _expect(mean, acc, "mean")
        _expect(invstd, acc, "invstd")
    # "general": a TensorIterator with dynamic casting accepts any floating dtypes.
    y = (input.double() - _view(mean.double(), input)) * _view(invstd.double(), input)
    if weight is not None:
        y = y * _view(weight.double(), input)
    if bias is not None:
        y = y + _view(bias.double(), input)
    memory_format = (
        torch.channels_last
        if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last)
        else torch.channels_last_3d
        if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d)
        else torch.contiguous_format
    )
    return y.to(input.dtype).contiguous(memory_format=memory_format)


@_kernel
def batch_norm_backward_reduce(grad_output, input, mean, invstd, weight, input_g, weight_g, bias_g):
    """Local ``(sum_dy, sum_dy_xmu, grad_weight, grad_bias)``.

    Channels-last path (both tensors channels-last compatible): computes everything it can and,
    without a weight, returns *empty* (numel 0) gradients instead of undefined ones. Contiguous
    path: outputs not asked for are undefined (``None``).
    """
    acc = _acc(input.dtype)
    centred = input.double() - _view(mean.double(), input)
    sum_dy = grad_output.double().sum(_dims(input))
    sum_dy_xmu = (grad_output.double() * centred).sum(_dims(input))
    grad_weight = sum_dy_xmu * invstd.double()
    if (
        _can_use_32bit_index_math(grad_output)
        and _use_channels_last_kernels(grad_output)
        and _use_channels_last_kernels(input)
        and (weight is None or weight.is_contiguous())
        and mean.is_contiguous()
        and invstd.is_contiguous()
    ):
        _expect(mean, acc, "mean")
        _expect(invstd, acc, "invstd")
        if weight is None:
            empty = torch.empty(0, dtype=mean.dtype)
            return sum_dy.to(mean.dtype), sum_dy_xmu.to(mean.dtype), empty, empty.clone()
        layer = acc if weight.dtype != input.dtype else input.dtype
        _expect(weight, layer, "weight")
        return (
            sum_dy.to(mean.dtype),
            sum_dy_xmu.to(mean.dtype),
            grad_weight.to(weight.dtype),
            sum_dy.to(weight.dtype),
        )
    if mean.dtype != invstd.dtype:
        raise RuntimeError("mean and invstd need to have the same data types")
    mixed = weight is not None and weight.dtype != input.dtype
    stat_scalar = acc if mixed else input.dtype
    _expect(mean, _acc(stat_scalar), "mean")
    _expect(invstd, _acc(stat_scalar), "invstd")
    _expect(weight, stat_scalar, "weight")
    if (weight_g or bias_g) and weight is None:
        raise RuntimeError("batch_norm_backward_reduce: weight/bias gradients need a weight")
    return (
        sum_dy.to(mean.dtype) if input_g else None,
        sum_dy_xmu.to(mean.dtype) if input_g else None,
        grad_weight.to(weight.dtype) if weight_g else None,
        sum_dy.to(weight.dtype) if bias_g else None,
    )


@_kernel
def batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """``(dy - sum_dy/N - (x - mean) invstd^2 sum_dy_xmu/N) invstd weight``, N = sum(count).

    ``count`` must be int32 (one entry per rank); their sum is taken in int64. The implementation
    is chosen by the *gradient's* layout alone.
    """
    acc = _acc(input.dtype)
    _expect(count, torch.int32, "count")
    if _can_use_32bit_index_math(grad_output) and _use_channels_last_kernels(grad_output):
        layer = acc if weight is not None and weight.dtype != input.dtype else input.dtype
        _expect(weight, layer, "weight")
        _expect(mean, acc, "mean")
        _expect(invstd, acc, "invstd")
        _expect(sum_dy, acc, "sum_dy")
        _expect(sum_dy_xmu, acc, "sum_dy_xmu")
        if not input.is_contiguous(memory_format=_format_of(grad_output)):
            raise RuntimeError(
                "batch_norm_backward_elemt (stand-in): the channels-last kernel reads the input "
                "with the gradient's strides; give both the same memory format"
            )
    else:
        if mean.dtype != invstd.dtype:
            raise RuntimeError("mean and invstd need to have the same data types")
        half_float = input.dtype in (torch.float16, torch.bfloat16) and mean.dtype == torch.float32
        stat_scalar = acc if half_float else input.dtype
        _expect(weight, stat_scalar, "weight")
        _expect(mean, _acc(stat_scalar), "mean")
        _expect(invstd, _acc(stat_scalar), "invstd")
        _expect(sum_dy, _acc(stat_scalar), "sum_dy")
        _expect(sum_dy_xmu, _acc(stat_scalar), "sum_dy_xmu")
    total = int(count.to(torch.int64).sum())
    norm = 1.0 / total
    invstd64 = _view(invstd.double(), input)
    centred = input.double() - _view(mean.double(), input)
    grad = (
        grad_output.double()
        - _view(sum_dy.double(), input) * norm
        - centred * invstd64 * invstd64 * _view(sum_dy_xmu.double(), input) * norm
    ) * invstd64
    if weight is not None:
        grad = grad * _view(weight.double(), input)
    return grad.to(input.dtype).contiguous(memory_format=_format_of(grad_output))


def _format_of(t: Tensor) -> torch.memory_format:
    """The memory format a kernel writes its output in: the input's, contiguous if ambiguous."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


@contextlib.contextmanager
def path(name: str):
    """Run ``"cpu"``: the CPU path as it is; ``"cuda_branch"``: the CUDA branch of
    :mod:`syncbn.function` on CPU, through this model of its kernels, its per-channel steps op
    by op; ``"cuda_branch_compiled"``: the same with those steps compiled, as on CUDA;
    ``"triton"`` / ``"aten"``: that kernel set by name (``SYNCBN_KERNELS``), on CPU tensors the
    Triton kernels through Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before
    ``triton`` is imported); ``"default"``: whatever the device chooses."""
    from syncbn import kernels

    names = ("cpu", "default", "cuda_branch", "cuda_branch_compiled", "triton", "aten")
    if name not in names:
        raise ValueError(f"path expected one of {names} (got {name!r})")
    requested = os.environ.get("SYNCBN_KERNELS")
    if name in ("triton", "aten"):
        os.environ["SYNCBN_KERNELS"] = name
    elif name.startswith("cuda_branch"):
        kernels.override.kernels = kernels.FusedKernels(
            sys.modules[__name__], compile_steps=name == "cuda_branch_compiled"
        )
    try:
        yield
    finally:
        if name.startswith("cuda_branch"):
            kernels.override.kernels = None
        if requested is None:
            os.environ.pop("SYNCBN_KERNELS", None)
        else:
            os.environ["SYNCBN_KERNELS"] = requested
