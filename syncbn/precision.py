"""The unsynchronized forward when the parameters are half precision and the statistics float32.

FSDP2's ``fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))`` casts a
layer's *parameters* to bfloat16 for the forward but leaves its *buffers* (the running
statistics) in float32, and casts the input to bfloat16. ``nn.BatchNorm``'s kernel refuses that
mix ("expected scalar type BFloat16 but found Float", torchtitan#674), which is what a group of
one rank (or eval mode) runs. It does accept half input with float32 parameters and statistics,
computing the statistics in float32: so the parameters go in as float32 (autograd casts their
gradients back), and the output keeps the input's dtype. The synchronized path handles the mix
itself (:func:`syncbn.kernels.stat_dtype`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["local_batch_norm", "mixed_parameters"]


def mixed_parameters(layer: _BatchNorm) -> bool:
    """Parameters in another dtype than the running statistics (FSDP2 mixed precision)."""
    weight, running = layer.weight, layer.running_mean
    return weight is not None and running is not None and weight.dtype != running.dtype


def local_batch_norm(layer: _BatchNorm, input: Tensor) -> Tensor:
    """``nn.BatchNorm``'s forward (momentum, ``num_batches_tracked``, eval mode) with the
    parameters cast to the running statistics' dtype."""
    momentum = 0.0 if layer.momentum is None else layer.momentum
    if layer.training and layer.track_running_stats:
        layer.num_batches_tracked.add_(1)
        if layer.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(layer.num_batches_tracked)
    use_batch_stats = layer.training or layer.running_mean is None
    track = not layer.training or layer.track_running_stats
    dtype = layer.running_mean.dtype
    return F.batch_norm(
        input,
        layer.running_mean if track else None,
        layer.running_var if track else None,
        layer.weight.to(dtype),
        None if layer.bias is None else layer.bias.to(dtype),
        use_batch_stats,
        momentum,
        layer.eps,
    )
