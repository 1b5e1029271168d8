"""What every kernel set shares: the statistics dtype, the reduced dimensions, memory formats."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics accumulate in float32, or float64 for float64 input (never in half precision)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channels (dim 1)."""
    return [0, *range(2, x.dim())]


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is dense in: channels_last (4-D) or channels_last_3d (5-D) when it
    is, else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """(C,) -> (C, 1, ..., 1), broadcastable against x of shape (N, C, *)."""
    return t.view((-1,) + (1,) * (x.dim() - 2))


def local_moments64(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's ``(count, mean, biased var)`` per channel in float64 (zeros when empty):
    telemetry's view of the local batch, off the training path."""
    count = x.numel() // x.shape[1]
    if count == 0:
        zeros = x.sum(reduce_dims(x), dtype=torch.float64)
        return zeros.new_zeros(()), zeros, zeros
    x64 = x.double()
    var, mean = torch.var_mean(x64, reduce_dims(x), correction=0)
    return torch.tensor(float(count), dtype=torch.float64, device=x.device), mean, var


def _as_type(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without an op when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def autocast_off(device_type: str):
    """Autocast disabled inside the layer (it manages its own dtypes); entering ``autocast``
    costs more than the small ops here, so only when it is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def dense(t: Tensor, like: Tensor | None = None) -> Tensor:
    """Dense in ``like``'s (default: its own) memory format, as the CUDA kernels need."""
    return t.contiguous(memory_format=memory_format(like if like is not None else t))
